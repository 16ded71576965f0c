"""Open-Sora v1.1 and v1.2 models side by side: which family a model directory holds, and loading it.

A transformer directory says what it holds in its config's `model_type` ("STDiT2" for v1.1, "STDiT3" for
v1.2; configs without one are STDiT2's). A VAE directory holds either an image `AutoencoderKL` (v1.1: frames
are encoded one by one) or v1.2's video VAE, whose config has a `temporal_vae` part.
"""

import os

from models.stdit.stdit2 import CONFIG_NAME, STDiT2, STDiT2Config
from models.stdit.stdit3 import STDiT3, STDiT3Config
from models.vae.vae import VideoAutoencoderKL
from models.vae.vae_v1_2 import VideoAutoencoderV1_2
from utils.errors import UserError
from utils.io import read_json_object

TRANSFORMER_CLASSES = {"STDiT2": (STDiT2, STDiT2Config), "STDiT3": (STDiT3, STDiT3Config)}


def model_type_of(values, source):
    """"STDiT2" or "STDiT3": a config's model_type (STDiT2 when it has none)."""
    model_type = values.get("model_type", "STDiT2")
    if model_type not in TRANSFORMER_CLASSES:
        raise UserError(f"{source}: model_type {model_type!r} is not one of {sorted(TRANSFORMER_CLASSES)}; convert "
                        "official weights with scripts/convert_checkpoint.py stdit2 or stdit3")
    return model_type


def transformer_type(path):
    """The model_type of a transformer directory's config.json, read without weights. A directory without a
    config is left to the STDiT2 loader, whose error says what it needs."""
    config_path = os.path.join(path, CONFIG_NAME)
    values = read_json_object(config_path, "transformer config") if os.path.isfile(config_path) else {}
    return model_type_of(values, path)


def read_transformer_config_file(path):
    """The STDiT2Config or STDiT3Config of a JSON config file (e.g. configs/stdit3/tiny.json)."""
    values = read_json_object(path, "transformer config (e.g. configs/stdit2/tiny.json)")
    return TRANSFORMER_CLASSES[model_type_of(values, path)][1].from_dict(values, source=path)


def transformer_class(config):
    """STDiT2 or STDiT3, the model a config builds."""
    return TRANSFORMER_CLASSES[config.model_name][0]


def read_transformer_config(path):
    """The STDiT2Config or STDiT3Config of a transformer directory, checked without loading weights."""
    return TRANSFORMER_CLASSES[transformer_type(path)][1].from_pretrained(path)


def load_transformer(path, dtype=None, **config_overrides):
    """The STDiT2 or STDiT3 of a transformer directory, as its config says."""
    return TRANSFORMER_CLASSES[transformer_type(path)][0].from_pretrained(path, dtype=dtype, **config_overrides)


def is_video_vae(path):
    """True for v1.2's video VAE, False for an image AutoencoderKL (read from config.json, no weights)."""
    config_path = os.path.join(path, CONFIG_NAME)
    return os.path.isfile(config_path) and "temporal_vae" in read_json_object(config_path, "VAE config")


def read_vae_config(path):
    """A VAE directory's config checked without loading weights: (latent channels, is_video_vae)."""
    if is_video_vae(path):
        return VideoAutoencoderV1_2.read_config(path).temporal_vae.embed_dim, True
    return VideoAutoencoderKL.read_config(path)["latent_channels"], False


def load_vae(path, micro_batch_size=None, dtype="float32"):
    """The VAE of a directory: v1.2's video VAE or an image AutoencoderKL applied frame by frame."""
    vae_class = VideoAutoencoderV1_2 if is_video_vae(path) else VideoAutoencoderKL
    return vae_class.from_pretrained(path, micro_batch_size, dtype)
