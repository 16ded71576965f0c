"""STDiT2, the VAE and the T5 encoder. Importing this package applies the CPU runtime set-up
(`utils.runtime.configure_on_import`): without it the STDiT2 runs about 2.8x slower on CPU."""

from utils.runtime import configure_on_import

configure_on_import()
