"""Text/image/video-conditioned generation shared by `scripts/inference.py` and `scripts/inference-long.py`.

Reads top to bottom like the scripts it serves: check the inputs, build the models, then per batch of
prompts: encode references, sample (loop by loop for long videos), decode and save.
"""

import dataclasses
import os
import sys

import numpy as np
import paddle

from utils.config_utils import DTYPES
from utils.errors import UserError
from utils.io import ensure_writable_dir
from utils.inference_utils import (
    add_loop_condition,
    apply_mask_strategy,
    collect_references,
    concat_loop_clips,
    default_condition_frame_length,
    extract_json_from_prompts,
    parse_mask_strategy,
    probe_reference,
    process_prompts,
    save_sample,
    validate_mask_strategy,
)

IMG_FPS = 120  # the fps condition of single images, as in the original


@dataclasses.dataclass
class GenerationJob:
    """One prompt with its conditioning, checked before any model work."""

    index: int  # position in the full prompt list; names the output file
    text_per_loop: list
    reference_path: str  # ';'-separated, or None
    mask_strategy: str  # or None


@dataclasses.dataclass
class Pipeline:
    model: object
    vae: object
    text_encoder: object
    scheduler: object


def plan_jobs(args):
    """Parse prompts, JSON tails, loop prompts and mask strategies; check references exist and fit."""
    texts, infos = extract_json_from_prompts(args.prompt)
    texts_per_loop = process_prompts(texts, args.loop)
    if args.loop > 1 and args.condition_frame_length is None:
        args.condition_frame_length = default_condition_frame_length(args.num_frames)
    jobs = []
    for index, (text_loops, info) in enumerate(zip(texts_per_loop, infos)):
        reference_path = info.get("reference_path", (args.reference_path or [None] * len(texts))[index]) or None
        mask_strategy = info.get("mask_strategy", (args.mask_strategy or [None] * len(texts))[index]) or None
        reference_lengths = [probe_reference(path) for path in reference_path.split(";")] if reference_path else []
        if mask_strategy is not None:
            if not reference_lengths:
                raise UserError(f"prompt {index}: mask_strategy {mask_strategy!r} needs a reference_path")
            groups = parse_mask_strategy(mask_strategy, num_references=len(reference_lengths))
            validate_mask_strategy(groups, reference_lengths=reference_lengths, num_frames=args.num_frames)
        elif reference_path is not None:
            mask_strategy = "0"  # a reference without a strategy conditions the first frame, as in the docs
        jobs.append(GenerationJob(index, text_loops, reference_path, mask_strategy))
    return jobs


def load_pipeline(args):
    from models.stdit.stdit2 import STDiT2, STDiT2Config
    from models.text_encoder.t5 import T5Encoder
    from models.vae.vae import VideoAutoencoderKL

    dtype = DTYPES[args.dtype]
    if dtype != "float32" and not paddle.device.is_compiled_with_cuda():
        raise UserError(f"--dtype {args.dtype} needs a GPU; this Paddle build is CPU-only, use --dtype fp32")
    if args.sampler == "iddpm" and not STDiT2Config.from_pretrained(args.model_path).pred_sigma:
        raise UserError(
            f"{args.model_path}: --sampler iddpm needs a model that predicts sigma (Open-Sora v1.1's learned "
            "variance) and this one has pred_sigma false; use --sampler rflow"
        )
    vae = VideoAutoencoderKL(args.vae_path, micro_batch_size=args.micro_batch_size, dtype=dtype)
    model = STDiT2.from_pretrained(args.model_path, dtype=dtype)
    model.eval()
    # T5 runs in fp32 whatever the model dtype: the original requires it for stable features.
    text_encoder = T5Encoder(args.text_encoder_path, model_max_length=model.config.model_max_length)
    if model.config.caption_channels != text_encoder.output_dim or model.config.in_channels != vae.out_channels:
        raise UserError(
            f"{args.model_path}: STDiT2 expects {model.config.in_channels} latent channels and caption width "
            f"{model.config.caption_channels}, but the VAE gives {vae.out_channels} and the text encoder "
            f"{text_encoder.output_dim}; pass the VAE and text encoder it was trained with"
        )
    text_encoder.y_embedder = model.y_embedder  # the null caption for classifier-free guidance
    return Pipeline(model, vae, text_encoder, build_sampler(args, vae))


def build_sampler(args, vae):
    if args.sampler == "iddpm":
        from schedulers.iddpm import IDDPM

        return IDDPM(num_sampling_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale, cfg_channel=args.cfg_channel)
    from schedulers.rflow import RFLOW

    return RFLOW(
        num_sampling_steps=args.num_sampling_steps,
        cfg_scale=args.cfg_scale,
        use_timestep_transform=args.use_timestep_transform,
        transform_scale=args.transform_scale,
        temporal_compression=vae.temporal_compression,
    )


def size_arguments(args, batch_size, dtype):
    height, width = args.image_size
    fps = IMG_FPS if args.num_frames == 1 else args.fps
    values = dict(height=height, width=width, num_frames=args.num_frames, ar=height / width, fps=fps)
    return {key: paddle.full([batch_size], value, dtype=dtype) for key, value in values.items()}


@paddle.no_grad()
def generate_videos(args, jobs, pipeline):
    """Yield (job, sample_k, video) for every job and sample; video is float32 numpy [3, T, H, W] in [-1, 1]."""
    model, vae = pipeline.model, pipeline.vae
    latent_size = vae.get_latent_size((args.num_frames, *args.image_size))
    model_dtype = model.x_embedder.proj.weight.dtype
    for batch_start in range(0, len(jobs), args.batch_size):
        batch = jobs[batch_start : batch_start + args.batch_size]
        # Seeded per batch from the prompt index, so the result of a prompt does not depend on how prompts
        # are split across processes.
        paddle.seed(args.seed + batch[0].index)
        references = collect_references([job.reference_path for job in batch], vae, args.image_size)
        additional_args = size_arguments(args, len(batch), model_dtype)
        for sample_k in range(args.num_sample):
            videos = generate_long_video(args, batch, references, pipeline, latent_size, additional_args)
            for job, video in zip(batch, videos):
                yield job, sample_k, np.asarray(video.numpy() if hasattr(video, "numpy") else video, dtype="float32")


def generate_long_video(args, batch, references, pipeline, latent_size, additional_args):
    """Sample `args.loop` clips; each later clip is conditioned on the end of the previous one."""
    vae = pipeline.vae
    mask_strategies = [job.mask_strategy for job in batch]
    references = [list(refs) for refs in references]
    clips = []
    for loop_i in range(args.loop):
        if loop_i > 0:
            # only the frames that condition the next clip are re-encoded
            previous_latents = vae.encode(clips[-1][:, :, -args.condition_frame_length :])
            references, mask_strategies = add_loop_condition(
                references, mask_strategies, previous_latents, loop_i, args.condition_frame_length
            )
        z = paddle.randn([len(batch), vae.out_channels, *latent_size], dtype="float32")
        frame_masks = apply_mask_strategy(z, references, mask_strategies, loop_i)
        prompts = [job.text_per_loop[loop_i] for job in batch]
        samples = pipeline.scheduler.sample(
            pipeline.model,
            pipeline.text_encoder,
            z=z,
            prompts=prompts,
            additional_args=additional_args,
            mask=frame_masks,
            progress=not args.quiet,
        )
        clips.append(vae.decode(samples.astype(pipeline.model.x_embedder.proj.weight.dtype)).astype("float32"))
    return concat_loop_clips(clips, args.condition_frame_length)


def shard_for_this_process(jobs):
    """Under `paddle.distributed.launch`, each process takes every world_size-th prompt."""
    world_size = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    return jobs[rank::world_size]


def run_inference(argv, description):
    """The whole command: arguments, checks, models, generation; prints one line per written file."""
    from utils.config_utils import parse_args
    from utils.runtime import configure_cpu_runtime, quiet_library_logs

    args = parse_args(argv, description)
    configure_cpu_runtime()
    quiet_library_logs()
    jobs = shard_for_this_process(plan_jobs(args))
    ensure_writable_dir(args.save_dir, "--save-dir")
    pipeline = load_pipeline(args)
    fit_image_size(args, pipeline.vae)
    warn_outside_training(args)
    for job, sample_k, video in generate_videos(args, jobs, pipeline):
        path = save_sample(video, fps=args.fps // args.frame_interval, save_path=output_path(args, job, sample_k), overwrite=args.overwrite)
        print(path, flush=True)


def fit_image_size(args, vae):
    """Round --image-size down to the VAE's downsampling factor (as the original's latent size does), and say so."""
    factor = vae.patch_size[1]
    height, width = args.image_size
    fitted = [max(factor, height // factor * factor), max(factor, width // factor * factor)]
    if fitted != [height, width]:
        print(
            f"note: --image-size {height} {width} is not a multiple of {factor} (the VAE's downsampling); "
            f"generating {fitted[0]}x{fitted[1]}",
            file=sys.stderr,
        )
    args.image_size = fitted


def warn_outside_training(args):
    """A model trained at one size makes noise at others; say so once instead of leaving the user to guess."""
    if args.trained_size is None:
        return
    num_frames, image_size = args.trained_size
    if (args.num_frames, list(args.image_size)) == (num_frames, image_size):
        return
    print(
        f"warning: {args.model_path} was trained on {num_frames} frames of {image_size[0]}x{image_size[1]} only; at "
        f"{args.num_frames} frames of {args.image_size[0]}x{args.image_size[1]} expect noise. For other sizes, convert "
        "official weights (README: Converting official weights) and pass --model-path",
        file=sys.stderr,
    )


def output_path(args, job, sample_k):
    """`{save_dir}/{sample_name}_{index}`, with `-k` when several samples are drawn per prompt (no extension)."""
    path = os.path.join(args.save_dir, f"{args.sample_name or 'sample'}_{job.index}")
    return f"{path}-{sample_k}" if args.num_sample != 1 else path
