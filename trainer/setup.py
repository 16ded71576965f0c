"""Checks and choices made once before training starts."""

import paddle
from paddlenlp.utils.log import logger

from utils.errors import UserError


def configure_precision(training_args):
    """fp16/bf16 need a GPU: on a CPU-only machine say so and train in fp32."""
    wants_half = training_args.fp16 or training_args.bf16
    if wants_half and not paddle.device.is_compiled_with_cuda():
        requested = "--fp16" if training_args.fp16 else "--bf16"
        logger.warning(f"{requested} needs a GPU; this Paddle build has none, so training runs in fp32")
        training_args.fp16 = training_args.bf16 = False
        training_args.fp16_full_eval = training_args.bf16_full_eval = False


def check_compatible(config, vae, text_encoder):
    """The STDiT2 must take the VAE's latents and the text encoder's features."""
    if config.in_channels != vae.out_channels:
        raise UserError(
            f"STDiT2 expects {config.in_channels} latent channels but the VAE gives {vae.out_channels}; "
            "use a matching --vae_path or --model_config"
        )
    if config.caption_channels != text_encoder.output_dim:
        raise UserError(
            f"STDiT2 expects caption features of width {config.caption_channels} but the text encoder gives "
            f"{text_encoder.output_dim}; use a matching --text_encoder_path or --model_config"
        )
    if config.model_max_length != text_encoder.model_max_length:
        raise UserError(
            f"STDiT2 was built for {config.model_max_length} caption tokens but --text_max_length is "
            f"{text_encoder.model_max_length}; leave --text_max_length unset"
        )


def build_training_scheduler(model_args, vae):
    if model_args.sampler == "iddpm":
        from schedulers.iddpm import IDDPM

        return IDDPM(timestep_respacing="")
    if model_args.sampler == "rflow":
        from schedulers.rflow import RFLOW

        return RFLOW(
            sample_method=model_args.rflow_sample_method,
            use_timestep_transform=model_args.rflow_use_timestep_transform,
            transform_scale=model_args.rflow_transform_scale,
            temporal_compression=vae.temporal_compression,
        )
    raise UserError(f"--sampler {model_args.sampler!r} is not supported; choose 'iddpm' or 'rflow'")


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
