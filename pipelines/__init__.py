"""Generation pipelines in the ppdiffusers style. Importing this package applies the CPU runtime set-up
(`utils.runtime.configure_on_import`), so a user's own program runs the models as fast as the scripts."""

from utils.runtime import configure_on_import

configure_on_import()

from pipelines.open_sora import Conditions, MaskGroup, OpenSoraPipeline, OpenSoraPipelineOutput, Reference  # noqa: E402

__all__ = ["Conditions", "MaskGroup", "OpenSoraPipeline", "OpenSoraPipelineOutput", "Reference"]
