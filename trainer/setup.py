"""Checks and choices made once before training starts, all of them before any model is loaded."""

import dataclasses
import os

import paddle
from paddlenlp.utils.log import logger

from models.families import read_transformer_config, read_transformer_config_file, read_vae_config
from schedulers.rflow import SAMPLE_METHODS
from pipelines.open_sora.settings import DEFAULT_MODEL_DIR, read_model_defaults, transformer_dir
from utils.errors import UserError

SAMPLERS = ("iddpm", "rflow")


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """The training objective, and the sampling settings exported with the model in inference.json."""

    sampler: str
    use_timestep_transform: bool
    transform_scale: float
    cfg_scale: float


def pretrained_model_path(model_args):
    """The STDiT2/STDiT3 directory to fine-tune (a pipeline directory's transformer), or None for a new model
    from --model_config."""
    if model_args.model_config and model_args.pretrained_model_path:
        raise UserError(
            "--model_config starts a new, randomly initialised model and --pretrained_model_path fine-tunes an "
            "existing one; pass only one of them"
        )
    if model_args.model_config:
        return None
    return transformer_dir(model_args.pretrained_model_path or DEFAULT_MODEL_DIR)


def read_model_source(model_args):
    """(STDiT2Config or STDiT3Config, the settings the fine-tuned model was trained for or {}), read without
    loading any weights."""
    path = pretrained_model_path(model_args)
    if path is None:
        return read_transformer_config_file(model_args.model_config), {}
    return read_transformer_config(path), read_model_defaults(model_args.pretrained_model_path or DEFAULT_MODEL_DIR)


def first_given(*values):
    return next(value for value in values if value is not None)


def resolve_diffusion_settings(model_args, config, model_defaults):
    """Flags given on the command line win. A fine-tuned model's inference.json fills in the rest, so that
    fine-tuning keeps the objective the model was trained with; a new model gets Open-Sora v1.1's IDDPM
    when it predicts sigma and rectified flow when it does not. Combinations that cannot train are refused."""
    sampler = first_given(model_args.sampler, model_defaults.get("sampler"), "iddpm" if config.pred_sigma else "rflow")
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r} is not supported; choose 'iddpm' or 'rflow'")
    if sampler == "rflow" and model_args.rflow_sample_method not in SAMPLE_METHODS:
        raise UserError(f"--rflow_sample_method {model_args.rflow_sample_method!r} is not one of {list(SAMPLE_METHODS)}")
    # The timestep shift belongs to the objective the model was trained with, not to another one.
    inherited = model_defaults if model_defaults.get("sampler") == sampler else {}
    use_timestep_transform = bool(
        first_given(model_args.rflow_use_timestep_transform, inherited.get("use_timestep_transform"), False)
    )
    inherited_scale = inherited.get("transform_scale") if use_timestep_transform else None
    settings = DiffusionSettings(
        sampler=sampler,
        use_timestep_transform=use_timestep_transform,
        transform_scale=float(first_given(model_args.rflow_transform_scale, inherited_scale, 1.0)),
        cfg_scale=float(first_given(model_args.inference_cfg_scale, model_defaults.get("cfg_scale"), 7.0)),
    )
    if sampler == "iddpm" and not config.pred_sigma:
        raise UserError(
            f"--sampler iddpm trains Open-Sora v1.1's learned variance, but this {config.model_name} has pred_sigma false (it "
            "predicts no sigma); use --sampler rflow, or a --model_config with \"pred_sigma\": true"
        )
    if settings.use_timestep_transform and sampler != "rflow":
        raise UserError("--rflow_use_timestep_transform applies to --sampler rflow only; drop it or use rflow")
    if settings.transform_scale != 1.0 and not settings.use_timestep_transform:
        raise UserError(
            f"--rflow_transform_scale {settings.transform_scale} has no effect without --sampler rflow "
            "--rflow_use_timestep_transform true; add them or drop it"
        )
    return settings


def configure_precision(training_args):
    """fp16/bf16 need a GPU: on a CPU-only machine say so and train in fp32."""
    wants_half = training_args.fp16 or training_args.bf16
    if wants_half and not paddle.device.is_compiled_with_cuda():
        requested = "--fp16" if training_args.fp16 else "--bf16"
        logger.warning(f"{requested} needs a GPU; this Paddle build has none, so training runs in fp32")
        training_args.fp16 = training_args.bf16 = False
        training_args.fp16_full_eval = training_args.bf16_full_eval = False


def configure_reporting(training_args):
    """Report to the --report_to integrations that are installed; skip the others with one warning each."""
    from paddlenlp.trainer.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    unknown = [name for name in training_args.report_to if name not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise UserError(f"--report_to {', '.join(unknown)}: not one of {sorted(INTEGRATION_TO_CALLBACK)}, 'all' or 'none'")
    available = get_available_reporting_integrations()
    for name in training_args.report_to:
        if name not in available:
            logger.warning(f"--report_to {name}: {name} is not installed, so training does not report to it")
    training_args.report_to = [name for name in training_args.report_to if name in available]


def check_compatible(config, model_args):
    """The STDiT must take the VAE's latents and the text encoder's features (read from their configs)."""
    from models.text_encoder.t5 import T5Encoder

    latent_channels, _ = read_vae_config(model_args.vae_path)
    caption_channels = T5Encoder.read_config(model_args.text_encoder_path)["d_model"]
    if config.in_channels != latent_channels:
        raise UserError(
            f"{config.model_name} expects {config.in_channels} latent channels but the VAE gives {latent_channels}; "
            "use a matching --vae_path or --model_config"
        )
    if config.caption_channels != caption_channels:
        raise UserError(
            f"{config.model_name} expects caption features of width {config.caption_channels} but the text encoder gives "
            f"{caption_channels}; use a matching --text_encoder_path or --model_config"
        )
    if model_args.text_max_length not in (None, config.model_max_length):
        raise UserError(
            f"{config.model_name} was built for {config.model_max_length} caption tokens but --text_max_length is "
            f"{model_args.text_max_length}; leave --text_max_length unset"
        )


def build_training_scheduler(settings, sample_method, vae):
    if settings.sampler == "iddpm":
        from schedulers.iddpm import IDDPM

        return IDDPM(timestep_respacing="")
    from schedulers.rflow import RFLOW

    return RFLOW(
        sample_method=sample_method,
        use_timestep_transform=settings.use_timestep_transform,
        transform_scale=settings.transform_scale,
    )


def check_replicas_agree(model):
    """After data-parallel training every rank must hold the same weights; compare a checksum across ranks."""
    import paddle.distributed as dist

    checksum = paddle.stack([p.astype("float64").sum() for p in model.parameters()]).sum().reshape([1])
    checksums = []
    dist.all_gather(checksums, checksum)
    values = [float(c.numpy().ravel()[0]) for c in checksums]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise RuntimeError(f"ranks ended with different weights (checksums {values}); data-parallel sync failed")
    logger.info(f"weights identical on all {len(values)} ranks (checksum {values[0]:.6f})")


def freeze_options(config, freeze):
    """--freeze as the model's config fields: STDiT2's `freeze`; STDiT3's `only_train_temporal` (not_temporal)
    and `freeze_y_embedder` (text: its cross-attention input stays fixed)."""
    if config.model_name == "STDiT2":
        return dict(freeze=freeze)
    return dict(only_train_temporal=freeze == "not_temporal", freeze_y_embedder=freeze == "text")

