"""The command line shared by `scripts/inference.py` and `scripts/inference-long.py`.

Flag names and spellings are the original Open-Sora ones. A value comes from, in order of precedence: the
command line, the `--config` JSON file, the model's `inference.json` (the settings it was trained for), and
the Open-Sora v1.1 sample defaults below.
"""

import argparse
import os

from utils.errors import UserError
from utils.io import read_json_object

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "assets", "default_model")
MODEL_DEFAULTS_NAME = "inference.json"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MAX_IMAGE_SIDE = 4096

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
)
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
    dtype="fp32",
    micro_batch_size=4,
    quiet=False,
    overwrite=False,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + traceback-like noise
        raise UserError(f"{message} (see --help)")


def build_parser(description):
    parser = _Parser(description=description, argument_default=argparse.SUPPRESS)
    add = parser.add_argument
    add("--config", help="JSON file of defaults for any of these flags (keys with underscores)")
    add("--prompt", nargs="+", help="one or more prompts; a JSON tail {\"reference_path\": ..., \"mask_strategy\": ...} adds conditioning")
    add("--prompt-path", help="text file with one prompt per line")
    add("--num-frames", type=int, help="frames per generated clip")
    add("--image-size", type=int, nargs=2, metavar=("H", "W"), help="height and width in pixels")
    add("--fps", type=int, help="frame rate the model is conditioned on; the video is saved at fps // frame-interval")
    add("--frame-interval", type=int, help="frame interval the model was trained with")
    add("--sample-name", help="output file prefix (default: sample)")
    add("--save-dir", help="output directory (default: ./samples/samples/)")
    add("--seed", type=int, help="random seed; the same seed and arguments give identical files")
    add("--batch-size", type=int, help="prompts sampled together")
    add("--num-sample", type=int, help="samples per prompt (files get a -k suffix)")
    add("--loop", type=int, help="clips chained into one long video")
    add("--condition-frame-length", type=int, help="frames of the previous clip that condition the next one")
    add("--reference-path", nargs="+", help="per prompt: ';'-separated reference images/videos")
    add("--mask-strategy", nargs="+", help="per prompt: mask strategy (see README)")
    add("--sampler", choices=["iddpm", "rflow"], help="diffusion sampler")
    add("--num-sampling-steps", type=int, help="sampling steps")
    add("--cfg-scale", type=float, help="classifier-free guidance scale")
    add("--cfg-channel", type=int, help="iddpm: guide only the first n latent channels (the original uses 3)")
    add("--dtype", choices=sorted(DTYPES), help="precision of STDiT2 and VAE (fp16/bf16 need a GPU)")
    add("--model-path", help="STDiT2 directory (default: the shipped model in assets/default_model)")
    add("--vae-path", help="ppdiffusers AutoencoderKL directory")
    add("--text-encoder-path", help="paddlenlp T5 directory")
    add("--micro-batch-size", type=int, help="frames the VAE decodes at once (bounds its memory)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--overwrite", action="store_true", help="replace existing output files instead of picking new names")
    return parser


def read_model_defaults(model_path):
    """The settings a model was trained for (its inference.json), or {} for a model without one."""
    defaults_path = os.path.join(model_path, MODEL_DEFAULTS_NAME)
    return read_json_object(defaults_path, "model inference defaults") if os.path.isfile(defaults_path) else {}


def sampling_defaults(model_path):
    """The Open-Sora v1.1 sample defaults overridden by the model's own inference.json, when it has one."""
    return {**OPEN_SORA_DEFAULTS, **read_model_defaults(model_path)}


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

    default_model = not any(key in cli or key in file_values for key in ("model_path", "vae_path", "text_encoder_path"))
    model_path = cli.get("model_path", file_values.get("model_path", os.path.join(DEFAULT_MODEL_DIR, "stdit2")))
    trained_for = read_model_defaults(model_path)
    model_defaults = {**OPEN_SORA_DEFAULTS, **trained_for}
    if default_model:
        model_defaults.update(
            vae_path=os.path.join(DEFAULT_MODEL_DIR, "vae"),
            text_encoder_path=os.path.join(DEFAULT_MODEL_DIR, "text_encoder"),
        )

    args = argparse.Namespace(**{**GENERIC_DEFAULTS, **model_defaults, **file_values, **cli})
    args.model_path = model_path
    args.trained_size = (trained_for["num_frames"], list(trained_for["image_size"])) if "image_size" in trained_for else None
    for required in ("vae_path", "text_encoder_path"):
        if not getattr(args, required, None):
            raise UserError(f"--{required.replace('_', '-')} is required with --model-path {model_path}")
    validate_args(args)
    return args


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
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise UserError(f"--micro-batch-size must be a positive integer, got {args.micro_batch_size}")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r} is not one of {sorted(DTYPES)}")
    if args.sampler not in ("iddpm", "rflow"):
        raise UserError(f"--sampler {args.sampler!r} is not supported; choose iddpm or rflow")
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
