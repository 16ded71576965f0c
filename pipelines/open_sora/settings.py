"""Sampling settings a model was trained for, and the schedulers they describe.

A trained STDiT directory carries `inference.json` (written by the trainer): its size, frame rate and the
sampler settings it was trained with, in the command line's vocabulary (`sampler`, `num_sampling_steps`,
`cfg_scale`, ...). A pipeline directory records the same in `model_index.json` and its scheduler's config.
Models without either get the sample defaults of their family: Open-Sora v1.1's for an STDiT2, v1.2's for an
STDiT3.
"""

import os

from schedulers.dpm_solver import DPMSolver
from schedulers.iddpm import IDDPM
from schedulers.rflow import RFLOW
from utils.io import read_json_object

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "assets", "default_model")
MODEL_DEFAULTS_NAME = "inference.json"
PIPELINE_INDEX_NAME = "model_index.json"

# Open-Sora v1.1 `configs/opensora-v1-1/inference/sample.py`, used for models without an inference.json.
OPEN_SORA_DEFAULTS = dict(
    num_frames=16,
    image_size=[240, 426],
    fps=24,
    frame_interval=3,
    sampler="iddpm",
    num_sampling_steps=100,
    cfg_scale=7.0,
    cfg_channel=3,
    # rflow only (Open-Sora v1.2): shift the sampling timesteps towards noise, as the model was trained.
    use_timestep_transform=False,
    transform_scale=1.0,
    aes=None,
)

# Open-Sora v1.2 `configs/opensora-v1-2/inference/sample.py` (240p at 9:16), used for STDiT3 models without an
# inference.json.
OPEN_SORA_V1_2_DEFAULTS = dict(
    num_frames=51,
    image_size=[240, 426],
    fps=24,
    frame_interval=1,
    sampler="rflow",
    num_sampling_steps=30,
    cfg_scale=7.0,
    cfg_channel=None,
    use_timestep_transform=True,
    transform_scale=1.0,
    aes=6.5,
)


def is_pipeline_dir(path):
    return os.path.isfile(os.path.join(path, PIPELINE_INDEX_NAME))


def transformer_dir(path):
    """The STDiT2 directory of `path`: a pipeline directory's transformer folder, or `path` itself."""
    return os.path.join(path, "transformer") if is_pipeline_dir(path) else path


def family_defaults(model_path):
    """The sample defaults of the family of a transformer or pipeline directory (read from its config)."""
    from models.families import transformer_type

    return OPEN_SORA_V1_2_DEFAULTS if transformer_type(transformer_dir(model_path)) == "STDiT3" else OPEN_SORA_DEFAULTS


def read_model_defaults(model_path):
    """The settings a model was trained for, in inference.json's vocabulary, or {} when it records none.

    `model_path` is an STDiT2 directory (its inference.json) or a pipeline directory (its model_index.json
    and scheduler config)."""
    if is_pipeline_dir(model_path):
        return read_pipeline_settings(model_path)
    defaults_path = os.path.join(model_path, MODEL_DEFAULTS_NAME)
    return read_json_object(defaults_path, "model inference defaults") if os.path.isfile(defaults_path) else {}


def read_pipeline_settings(path):
    from pipelines.open_sora.pipeline_open_sora import load_scheduler

    index = read_json_object(os.path.join(path, PIPELINE_INDEX_NAME), "pipeline index")
    settings = scheduler_settings(load_scheduler(os.path.join(path, "scheduler")))
    if index.get("num_frames") is not None:
        settings.update(num_frames=index["num_frames"], image_size=[index["height"], index["width"]], fps=index["fps"])
    if index.get("frame_interval") is not None:
        settings["frame_interval"] = index["frame_interval"]
    return settings


def scheduler_settings(scheduler):
    """A scheduler's settings in inference.json's vocabulary (the inverse of `build_scheduler`)."""
    if isinstance(scheduler, (IDDPM, DPMSolver)):
        return dict(sampler="iddpm" if isinstance(scheduler, IDDPM) else "dpm-solver",
                    num_sampling_steps=scheduler.num_inference_steps, cfg_scale=scheduler.cfg_scale,
                    cfg_channel=scheduler.cfg_channel)
    return dict(sampler="rflow", num_sampling_steps=scheduler.num_sampling_steps, cfg_scale=scheduler.cfg_scale,
                use_timestep_transform=scheduler.use_timestep_transform, transform_scale=scheduler.transform_scale)


def build_scheduler(settings):
    """The sampling scheduler that `settings` (inference.json's vocabulary) describe."""
    if settings["sampler"] in ("iddpm", "dpm-solver"):
        sampler = IDDPM if settings["sampler"] == "iddpm" else DPMSolver
        return sampler(num_sampling_steps=settings["num_sampling_steps"], cfg_scale=settings["cfg_scale"],
                       cfg_channel=settings.get("cfg_channel"))
    return RFLOW(
        num_sampling_steps=settings["num_sampling_steps"],
        cfg_scale=settings["cfg_scale"],
        use_timestep_transform=settings.get("use_timestep_transform", False),
        transform_scale=settings.get("transform_scale", 1.0),
    )
