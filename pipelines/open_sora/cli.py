"""The command line of `scripts/inference.py` and `scripts/inference-long.py` over `OpenSoraPipeline`.

Flag names and spellings are the original Open-Sora ones. A value comes from, in order of precedence: the
command line, the `--config` JSON file, the settings the model was trained for (`settings.py`), and the Open-Sora
v1.1 sample defaults. The prompt syntax of the original lives here and nowhere else:

- a prompt may end with a JSON object `{"reference_path": "a.png;b.mp4", "mask_strategy": "0;0,1,0,-1,1"}`;
- a mask strategy is a `;`-separated list of groups `loop_id,m_id,m_ref_start,m_target_start,m_length,edit_ratio`
  (missing trailing fields default to `0,0,0,0,1,0`), each one `MaskGroup`;
- `|0|a dog|2|a cat` gives "a dog" to loops 0-1 and "a cat" from loop 2 on.
"""

import argparse
import dataclasses
import json
import os
import sys

from models.stdit.attention_cache import ATTENTION_CACHE_PRESETS
from pipelines.open_sora.conditioning import Conditions, MaskGroup, MaskGroupError, Reference
from pipelines.open_sora.pipeline_open_sora import CAMERA_MOTIONS, clean_prompt
from pipelines.open_sora.settings import (
    DEFAULT_MODEL_DIR,
    build_scheduler,
    family_defaults,
    is_pipeline_dir,
    read_model_defaults,
    transformer_dir,
)
from utils import aspect
from utils.errors import UserError
from utils.io import ensure_writable_dir, read_json_object
from utils.media import save_video

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SAMPLERS = ("iddpm", "rflow", "dpm-solver")
DPM_SOLVER_STEPS = 20  # DPM-Solver++ needs a fifth of IDDPM's 100 steps (README: Performance)
MAX_IMAGE_SIDE = 4096
JSON_KEYS = ("reference_path", "mask_strategy")
MASK_FIELDS = ("loop_id", "m_id", "m_ref_start", "m_target_start", "m_length", "edit_ratio")
MASK_DEFAULTS = ("0", "0", "0", "0", "1", "0")
GENERIC_DEFAULTS = dict(
    prompt=None,
    prompt_path=None,
    sample_name=None,
    save_dir="./samples/samples/",
    seed=42,
    batch_size=1,
    num_sample=1,
    loop=1,
    condition_frame_length=None,
    reference_path=None,
    mask_strategy=None,
    attention_cache=None,
    resolution=None,
    aspect_ratio=None,
    align=None,
    flow=None,
    camera_motion=None,
    dtype="fp32",
    micro_batch_size=4,
    stream_text_encoder=False,
    quiet=False,
    overwrite=False,
)


def short(text, limit=60):
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------------ flags


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + traceback-like noise
        raise UserError(f"{message} (see --help)")


def build_parser(description):
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("--config", help="JSON file of defaults for any of these flags (keys with underscores)")
    add("--prompt", nargs="+", help="one or more prompts; a JSON tail {\"reference_path\": ..., \"mask_strategy\": ...} adds conditioning")
    add("--prompt-path", help="text file with one prompt per line")
    add("--num-frames", help="frames per generated clip: a count, or 2s, 4s, 8s, 16s, 32s (51 frames per 2 s, as v1.2)")
    add("--image-size", type=int, nargs=2, metavar=("H", "W"), help="height and width in pixels")
    add("--resolution", help="size by name instead of --image-size: 144p, 240p, 360p, 480p, 720p, ... (v1.2)")
    add("--aspect-ratio", help="with --resolution: height:width name, e.g. 9:16 (landscape, the default), 1:1, 16:9")
    add("--fps", type=int, help="frame rate the model is conditioned on; the video is saved at fps // frame-interval")
    add("--frame-interval", type=int, help="frame interval the model was trained with")
    add("--sample-name", help="output file prefix (default: sample)")
    add("--save-dir", help="output directory (default: ./samples/samples/)")
    add("--seed", type=int, help="random seed; the same seed and arguments give identical files")
    add("--batch-size", type=int, help="prompts sampled together")
    add("--num-sample", type=int, help="samples per prompt (files get a -k suffix)")
    add("--loop", type=int, help="clips chained into one long video")
    add("--condition-frame-length", type=int, help="frames of the previous clip that condition the next one "
        "(default: 17 with a v1.2 VAE, a quarter of --num-frames otherwise)")
    add("--align", type=int, help="conditioned latent frames start at a multiple of this (default: 5 with a v1.2 VAE, "
        "its chunk of 17 frames; 1 = where the frames fall)")
    add("--aes", type=float, help="v1.2: aesthetic score appended to the prompt (default 6.5 for v1.2 models)")
    add("--flow", type=float, help="v1.2: motion score appended to the prompt")
    add("--camera-motion", help=f"v1.2: camera motion appended to the prompt: {', '.join(CAMERA_MOTIONS)}")
    add("--reference-path", nargs="+", help="per prompt: ';'-separated reference images/videos")
    add("--mask-strategy", nargs="+", help="per prompt: mask strategy (see README)")
    add("--sampler", choices=list(SAMPLERS), help="diffusion sampler; dpm-solver: DPM-Solver++ (20 steps by default) "
        "for IDDPM-trained models")
    add("--num-sampling-steps", type=int, help="sampling steps")
    add("--cfg-scale", type=float, help="classifier-free guidance scale")
    add("--attention-cache", choices=list(ATTENTION_CACHE_PRESETS), help="reuse attention outputs across neighbouring "
        "sampling steps (Pyramid Attention Broadcast): faster, slightly different videos (README: Performance)")
    add("--cfg-channel", type=int, help="iddpm: guide only the first n latent channels (the original uses 3)")
    add("--dtype", choices=sorted(DTYPES), help="precision of STDiT2 and VAE (fp16/bf16 need a GPU)")
    add("--model-path", help="STDiT2/STDiT3 or pipeline directory (default: the shipped model in assets/default_model)")
    add("--vae-path", help="ppdiffusers AutoencoderKL directory")
    add("--text-encoder-path", help="paddlenlp T5 directory")
    add("--stream-text-encoder", action="store_true", help="hold one T5 block's weights in memory at a time, read from "
        "its safetensors checkpoint (T5-XXL: 0.8 GB instead of 19 GB; README: Performance)")
    add("--micro-batch-size", type=int, help="frames the VAE decodes at once (bounds its memory)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--overwrite", action="store_true", help="replace existing output files instead of picking new names")
    return parser


def parse_args(argv, description):
    """Parse and resolve the inference arguments; validates everything that needs no model."""
    parser = build_parser(description)
    cli = vars(parser.parse_args(argv))
    file_values = {}
    if "config" in cli:
        file_values = read_json_object(cli.pop("config"), "--config file")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise UserError(f"--config: unknown keys {unknown}; use flag names with underscores, e.g. num_frames")

    model_path = cli.get("model_path", file_values.get("model_path", DEFAULT_MODEL_DIR))
    if not os.path.isdir(model_path):
        raise UserError(f"--model-path {model_path}: model directory not found; give a directory written by "
                        "save_pretrained or by scripts/convert_checkpoint.py stdit2 or stdit3")
    trained_for = read_model_defaults(model_path)
    given = {**file_values, **cli}
    args = argparse.Namespace(**{**GENERIC_DEFAULTS, **family_defaults(model_path), **trained_for, **given})
    args.model_path = model_path
    resolve_size_names(args, given)
    if args.sampler == "dpm-solver":
        if trained_for.get("sampler") == "rflow":
            raise UserError(f"--sampler dpm-solver solves the IDDPM process, but {model_path} was trained with rectified "
                            "flow; use --sampler rflow")
        if "num_sampling_steps" not in given:
            args.num_sampling_steps = DPM_SOLVER_STEPS
    args.trained_size = (trained_for["num_frames"], list(trained_for["image_size"])) if "image_size" in trained_for else None
    if not is_pipeline_dir(model_path):
        for required in ("vae_path", "text_encoder_path"):
            if not getattr(args, required, None):
                raise UserError(f"--{required.replace('_', '-')} is required with --model-path {model_path}")
    validate_args(args)
    return args


def resolve_size_names(args, given):
    """v1.2's size names: `--num-frames 4s` -> 102 frames, `--resolution 240p --aspect-ratio 9:16` -> 240x426."""
    try:
        args.num_frames = aspect.num_frames(args.num_frames)
        if given.get("resolution") is not None or given.get("aspect_ratio") is not None:
            if "image_size" in given:
                raise UserError("give either --image-size or --resolution/--aspect-ratio, not both")
            args.image_size = aspect.image_size(args.resolution or "240p", args.aspect_ratio or "9:16")
    except ValueError as error:
        raise UserError(f"--{str(error).replace('_', '-')}") from None


def validate_args(args):
    if args.prompt is None and args.prompt_path is None:
        raise UserError("no prompt: give --prompt \"...\" or --prompt-path FILE")
    if args.prompt is None:
        args.prompt = read_prompt_file(args.prompt_path)
    if any(not prompt.strip() for prompt in args.prompt):
        raise UserError("--prompt: empty prompt; give some text")
    for name in ("num_frames", "batch_size", "num_sample", "loop", "fps", "frame_interval", "num_sampling_steps"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    height, width = args.image_size
    if not (0 < height <= MAX_IMAGE_SIDE and 0 < width <= MAX_IMAGE_SIDE):
        raise UserError(f"--image-size {height} {width}: each side must be between 1 and {MAX_IMAGE_SIDE} pixels")
    if args.condition_frame_length is not None and not 0 < args.condition_frame_length < args.num_frames:
        raise UserError(
            f"--condition-frame-length {args.condition_frame_length} must be between 1 and --num-frames - 1 "
            f"({args.num_frames - 1})"
        )
    if args.align is not None and args.align < 1:
        raise UserError(f"--align must be a positive number of latent frames, got {args.align}")
    if args.camera_motion is not None and args.camera_motion not in CAMERA_MOTIONS:
        raise UserError(f"--camera-motion {args.camera_motion!r} is not one of {list(CAMERA_MOTIONS)}")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise UserError(f"--micro-batch-size must be a positive integer, got {args.micro_batch_size}")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    if args.sampler not in SAMPLERS:
        raise UserError(f"--sampler {args.sampler!r} is not supported; choose one of {list(SAMPLERS)}")
    if args.sampler == "iddpm" and args.num_sampling_steps < 2:
        raise UserError("--num-sampling-steps must be at least 2 with --sampler iddpm (its variance at t = 0 is clipped to the next step's)")
    for name in ("reference_path", "mask_strategy"):
        values = getattr(args, name)
        if values is not None and len(values) != len(args.prompt):
            raise UserError(
                f"--{name.replace('_', '-')} has {len(values)} entries but there are {len(args.prompt)} prompts; "
                "give one per prompt (use \"\" for none)"
            )


def read_prompt_file(path):
    if not os.path.isfile(path):
        raise UserError(f"--prompt-path {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"--prompt-path {path}: not a UTF-8 text file") from None
    if not prompts:
        raise UserError(f"--prompt-path {path}: the file has no prompts; write one prompt per line")
    return prompts


# ----------------------------------------------------------------------------------------------- prompts


def split_json_tail(prompt):
    """A prompt's text and the conditioning of its JSON tail ({} without one)."""
    text, brace, tail = prompt.partition("{")
    if not brace:
        return text, {}
    try:
        info = json.loads(brace + tail)
    except json.JSONDecodeError as error:
        raise UserError(f"prompt {short(prompt)!r}: the JSON after the text is malformed ({error.msg}); write e.g. "
                        '{"reference_path": "a.png", "mask_strategy": "0"}') from None
    if not isinstance(info, dict):
        raise UserError(f"prompt {short(prompt)!r}: the text must be followed by a JSON object")
    unknown = sorted(set(info) - set(JSON_KEYS))
    if unknown:
        raise UserError(f"prompt {short(prompt)!r}: unknown keys {unknown}; only {list(JSON_KEYS)} are allowed")
    for key, value in info.items():
        if not isinstance(value, str):
            raise UserError(f"prompt {short(prompt)!r}: {key} must be a string, got {json.dumps(value)}")
    return text, info


def texts_per_loop(text, num_loop):
    """`|0|a dog|2|a cat` -> one text per loop; a plain text is used for every loop."""
    if not text.startswith("|"):
        return [text] * num_loop
    parts = text.split("|")[1:]
    if len(parts) % 2:
        raise UserError(f"prompt {short(text)!r}: loop prompts must alternate |loop|text|, e.g. |0|a dog|2|a cat")
    starts, segments = parts[0::2], parts[1::2]
    try:
        starts = [int(s) for s in starts]
    except ValueError:
        raise UserError(f"prompt {short(text)!r}: loop ids {starts} must be integers") from None
    if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= num_loop:
        raise UserError(f"prompt {short(text)!r}: loop ids {starts} must start at 0, increase, and stay below --loop {num_loop}")
    ends = starts[1:] + [num_loop]
    return [segment for segment, a, b in zip(segments, starts, ends) for _ in range(b - a)]


def parse_mask_strategy(mask_strategy, num_references):
    """A mask strategy string -> MaskGroups, with errors that quote the group as the user wrote it."""
    groups = []
    for number, group in enumerate(mask_strategy.split(";"), start=1):
        fields = [field.strip() for field in group.split(",")]
        where = f'mask_strategy group {number} "{group}"'
        if not 1 <= len(fields) <= 6 or fields == [""]:
            raise UserError(f"{where}: needs 1 to 6 comma-separated fields {','.join(MASK_FIELDS)}")
        fields += MASK_DEFAULTS[len(fields):]
        try:
            values = [int(field) for field in fields[:5]] + [float(fields[5])]
        except ValueError:
            raise UserError(f"{where}: fields must be numbers (five integers, then edit_ratio)") from None
        if values[1] >= num_references:
            raise UserError(f"{where}: m_id {values[1]} has no reference ({num_references} given: 0..{num_references - 1})")
        try:
            groups.append(MaskGroup(*values))
        except MaskGroupError as error:
            raise UserError(f"{where}: {error.problem}") from None
    return groups


@dataclasses.dataclass
class GenerationJob:
    """One prompt with its conditioning, checked before any model work."""

    index: int  # position in the full prompt list; names the output file
    texts: list  # one per loop
    conditions: Conditions


def plan_jobs(args):
    """Parse prompts, JSON tails, loop prompts and mask strategies into jobs; check that references exist and
    that every group fits, in the command line's terms."""
    jobs = []
    for index, prompt in enumerate(args.prompt):
        text, info = split_json_tail(prompt)
        reference_path = info.get("reference_path", (args.reference_path or [None] * len(args.prompt))[index]) or None
        mask_strategy = info.get("mask_strategy", (args.mask_strategy or [None] * len(args.prompt))[index]) or None
        references = [Reference(path) for path in reference_path.split(";")] if reference_path else []
        if mask_strategy is not None and not references:
            raise UserError(f"prompt {index}: mask_strategy {mask_strategy!r} needs a reference_path")
        # a reference without a strategy conditions the first frame, as in the docs
        groups = parse_mask_strategy(mask_strategy, len(references)) if mask_strategy else []
        conditions = Conditions(references, groups)
        try:
            conditions.check(args.num_frames, args.loop)
        except MaskGroupError as error:
            number = conditions.mask_groups.index(error.group)
            raise UserError(f'mask_strategy group {number + 1} "{(mask_strategy or "0").split(";")[number]}": '
                            f"{error.problem}") from None
        texts = texts_per_loop(text, args.loop)
        for segment in texts:
            clean_prompt(segment)  # fails now, not after the models have loaded
        jobs.append(GenerationJob(index, texts, conditions))
    return jobs


# ------------------------------------------------------------------------------------------- generation


def load_pipeline(args):
    from pipelines.open_sora.pipeline_open_sora import OpenSoraPipeline

    dtype = DTYPES[args.dtype]
    scheduler = build_scheduler(vars(args))
    vae_path, text_encoder_path = getattr(args, "vae_path", None), getattr(args, "text_encoder_path", None)
    if is_pipeline_dir(args.model_path) and vae_path is None and text_encoder_path is None:
        pipe = OpenSoraPipeline.from_pretrained(args.model_path, dtype=dtype, vae_micro_batch_size=args.micro_batch_size,
                                                scheduler=scheduler, stream_text_encoder=args.stream_text_encoder)
    else:
        # --vae-path / --text-encoder-path replace the parts of a pipeline directory they name
        pipe = OpenSoraPipeline.from_component_paths(
            transformer_dir(args.model_path), vae_path or os.path.join(args.model_path, "vae"),
            text_encoder_path or os.path.join(args.model_path, "text_encoder"), scheduler, dtype=dtype,
            vae_micro_batch_size=args.micro_batch_size, stream_text_encoder=args.stream_text_encoder,
        )
    if args.sampler == "iddpm" and not pipe.transformer.config.pred_sigma:
        raise UserError(
            f"{args.model_path}: --sampler iddpm needs a model that predicts sigma (Open-Sora v1.1's learned "
            "variance) and this one has pred_sigma false; use --sampler rflow"
        )
    pipe.set_progress_bar_config(disable=args.quiet, leave=False, desc=args.sampler)
    return pipe


def fit_image_size(image_size, factor):
    """Round a size down to the VAE's downsampling factor (as the original's latent size does), and say so."""
    height, width = image_size
    fitted = [max(factor, height // factor * factor), max(factor, width // factor * factor)]
    if fitted != [height, width]:
        print(
            f"note: --image-size {height} {width} is not a multiple of {factor} (the VAE's downsampling); "
            f"generating {fitted[0]}x{fitted[1]}",
            file=sys.stderr,
        )
    return fitted


def warn_outside_training(args, image_size):
    """A model trained at one size makes noise at others; say so once instead of leaving the user to guess."""
    if args.trained_size is None:
        return
    num_frames, trained_image_size = args.trained_size
    if (args.num_frames, list(image_size)) == (num_frames, trained_image_size):
        return
    print(
        f"warning: {args.model_path} was trained on {num_frames} frames of {trained_image_size[0]}x{trained_image_size[1]} "
        f"only; at {args.num_frames} frames of {image_size[0]}x{image_size[1]} expect noise. For other sizes, convert "
        "official weights (README: Converting official weights) and pass --model-path",
        file=sys.stderr,
    )


def shard_for_this_process(jobs):
    """Under `paddle.distributed.launch`, each process takes every world_size-th prompt."""
    world_size = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
    return jobs[rank::world_size]


def generate(pipe, args, jobs, image_size):
    """Yield (job, sample_k, uint8 frames [T, H, W, 3]) for every job and sample.

    Each batch is seeded from its first prompt's index, so a prompt's result does not depend on how the
    prompts are split across processes."""
    height, width = image_size
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        output = pipe(
            [job.texts for job in batch], conditions=[job.conditions for job in batch], num_frames=args.num_frames,
            height=height, width=width, fps=args.fps, loop=args.loop, condition_frame_length=args.condition_frame_length,
            align=args.align, attention_cache=args.attention_cache, aesthetic_score=args.aes, motion_score=args.flow, camera_motion=args.camera_motion,
            num_inference_steps=args.num_sampling_steps, guidance_scale=args.cfg_scale, seed=args.seed + batch[0].index,
            num_videos_per_prompt=args.num_sample,
        )
        for position, frames in enumerate(output.frames):
            yield batch[position // args.num_sample], position % args.num_sample, frames


def output_path(args, job, sample_k):
    """`{save_dir}/{sample_name}_{index}`, with `-k` when several samples are drawn per prompt (no extension)."""
    path = os.path.join(args.save_dir, f"{args.sample_name or 'sample'}_{job.index}")
    return f"{path}-{sample_k}" if args.num_sample != 1 else path


def run_inference(argv, description):
    """The whole command: arguments, checks, models, generation; prints one line per written file."""
    from utils.runtime import configure_cpu_runtime, quiet_library_logs

    configure_cpu_runtime()
    args = parse_args(argv, description)
    quiet_library_logs()
    jobs = shard_for_this_process(plan_jobs(args))
    ensure_writable_dir(args.save_dir, "--save-dir")
    pipe = load_pipeline(args)
    image_size = fit_image_size(args.image_size, pipe.vae_scale_factor)
    warn_outside_training(args, image_size)
    for job, sample_k, frames in generate(pipe, args, jobs, image_size):
        path = save_video(frames, fps=args.fps // args.frame_interval, save_path=output_path(args, job, sample_k),
                          overwrite=args.overwrite)
        print(path, flush=True)
