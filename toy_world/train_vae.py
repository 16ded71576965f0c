"""Train the small image VAE (ppdiffusers AutoencoderKL) of the demo model on frames of a video data set.

    python toy_world/train_vae.py --data-dir /work/data/synthetic --output-dir assets/default_model/vae

Frames come from the mp4s listed in <data-dir>/train.csv (decoded with PyAV, the same path as user data),
mixed with random colour frames (`--colour-fraction`): objects are 5% of a toy frame's pixels and no toy
frame is filled with a saturated colour, so a VAE trained on toy frames alone reproduces the backgrounds
and shifts every object colour (the first shipped VAE turned red into orange and a red frame into grey).
PSNR is measured on the frames of <data-dir>/heldout.csv, and the colour report on palette objects and
solid frames (`colour_report`). After training the latent scale is measured and stored as
`scaling_factor = 1 / std(latents)` in the saved config, so the diffusion model sees unit-variance latents.
The output folder (config.json, diffusion_pytorch_model.safetensors, training_report.json) is replaced
atomically at the end. Every --checkpoint-every steps the state goes to <output-dir>.partial; the same
command run again resumes there and ends with the weights an uninterrupted run gives.
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Set before Paddle loads Intel OpenMP: after Adam's kernels have run, their idle OpenMP threads spin for the
# default 200 ms and take the cores from the convolutions, which then run ~3x slower on a 2-core machine.
os.environ.setdefault("KMP_BLOCKTIME", "0")

import argparse
import csv
import itertools
import json
import math
import shutil
import time

import av
import numpy as np
import paddle
from PIL import Image, ImageDraw
from ppdiffusers import AutoencoderKL

from toy_world import synthetic
from utils.errors import UserError, run_cli
from utils.io import atomic_path
from utils.runtime import configure_cpu_runtime

# 64x64 frames -> 8x8x4 latents: four resolution levels, three of which halve the size. The channel counts
# are small because the frames are simple and CPU training time grows with the full-resolution width.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 48, 48],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="folder holding train.csv and heldout.csv")
    parser.add_argument("--output-dir", required=True, help="folder for the trained VAE (replaced at the end)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine-decayed to 1%% of it")
    parser.add_argument(
        "--kl-weight", type=float, default=1e-5, help="weight of the KL term summed per frame, over pixels"
    )
    parser.add_argument(
        "--colour-fraction", type=float, default=0.5, help="share of each batch drawn as random colour frames"
    )
    parser.add_argument(
        "--lowpass-weight",
        type=float,
        default=1.0,
        help="weight of the squared error of 8x8-pooled colours, which the per-pixel terms barely see",
    )
    parser.add_argument(
        "--block-out-channels", type=int, nargs="+", default=None,
        help="channels of each resolution level of a new VAE; every level after the first halves the size "
        f"(default {VAE_CONFIG['block_out_channels']})",
    )
    parser.add_argument(
        "--latent-channels", type=int, default=None, help=f"of a new VAE (default {VAE_CONFIG['latent_channels']})"
    )
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up; use ~100 with --init-from")
    parser.add_argument("--init-from", default=None, help="continue training this saved VAE instead of a new one")
    parser.add_argument("--max-clips", type=int, default=None, help="use only the first N training clips")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--checkpoint-every", type=int, default=200,
        help="steps between checkpoints in <output-dir>.partial; a rerun of the same command resumes from the last one",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def read_video_frames(path):
    """All frames of a video file as [T, H, W, 3] uint8."""
    try:
        with av.open(path) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, OSError) as error:
        raise UserError(f"{path}: cannot be decoded as a video ({error}); regenerate or remove it from the CSV")
    return np.stack(frames)


def load_frames(csv_path, max_clips=None):
    """Every frame of the videos listed in a meta CSV, [N, H, W, 3] uint8 (all videos must share one size)."""
    if not os.path.isfile(csv_path):
        raise UserError(f"{csv_path}: no such file; run toy_world/make_synthetic_data.py first")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{csv_path}: lists no videos; pass a meta CSV with at least one row")
    base = os.path.dirname(os.path.abspath(csv_path))
    clips = [read_video_frames(os.path.join(base, row["path"])) for row in rows[:max_clips]]
    if len({clip.shape[1:] for clip in clips}) != 1:
        raise UserError(f"{csv_path}: videos differ in size; the VAE trainer needs one frame size")
    return np.concatenate(clips)


def random_colour(rng):
    """Uniform RGB a quarter of the time rarely comes near grey or white (0.09% of its pixels have every channel
    above 215), which the toy world's white objects and grey background need: the rest are greys and near-white
    tints, and saturated colours, whose hue a VAE trained on dark toy frames loses first."""
    kind = rng.integers(4)
    if kind == 0:
        return tuple(int(v) for v in rng.integers(0, 256, size=3))
    if kind == 1:
        level = rng.integers(0, 256)
        return tuple(int(np.clip(level + v, 0, 255)) for v in rng.integers(-12, 13, size=3))
    if kind == 2:
        return tuple(int(v) for v in rng.integers(200, 256, size=3))
    rgb = rng.integers(0, 256, size=3)
    rgb[rng.integers(3)] = rng.integers(180, 256)
    rgb[rng.integers(3)] = rng.integers(0, 70)
    return tuple(int(v) for v in rgb)


def random_background(rng, height, width):
    """[H, W, 3] float: a solid colour, a linear gradient at any angle, or a smooth random colour field."""
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(np.array(random_colour(rng), float), (height, width, 3)).copy()
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        rows, cols = np.mgrid[0:height, 0:width]
        position = np.cos(angle) * cols / width + np.sin(angle) * rows / height
        weight = ((position - position.min()) / max(np.ptp(position), 1e-6))[..., None]
        return (1 - weight) * np.array(random_colour(rng), float) + weight * np.array(random_colour(rng), float)
    # A few random colours on a coarse grid, blended bicubically: soft regions like a photograph's.
    grid = rng.integers(2, 6)
    coarse = rng.integers(0, 256, size=(grid, grid, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), float)


def random_colour_frame(rng, height, width):
    """One uint8 [H, W, 3] frame: a random background with up to three shapes of random colours and sizes."""
    image = Image.fromarray(np.clip(random_background(rng, height, width), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 4)):
        size = rng.uniform(0.1, 0.7) * min(height, width)
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        box = [x - size / 2, y - size / 2, x + size / 2, y + size / 2]
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse(box, fill=random_colour(rng))
        elif shape == 1:
            draw.rectangle(box, fill=random_colour(rng))
        else:
            draw.polygon([(x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=random_colour(rng))
    return np.asarray(image)


def training_batch(rng, frames, batch_size, colour_fraction):
    """uint8 [B, H, W, 3]: toy frames, with each one replaced by a random colour frame with probability
    `colour_fraction`."""
    batch = frames[rng.integers(len(frames), size=batch_size)].copy()
    height, width = batch.shape[1:3]
    for index in np.flatnonzero(rng.random(batch_size) < colour_fraction):
        batch[index] = random_colour_frame(rng, height, width)
    return batch


def to_model_input(frames):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1]."""
    return paddle.to_tensor(frames.transpose(0, 3, 1, 2).astype("float32") / 127.5 - 1.0)


def psnr(frames, reconstructions):
    """PSNR in dB of uint8-range images given as [-1, 1] tensors."""
    mse = float(((frames.clip(-1, 1) - reconstructions.clip(-1, 1)) / 2).square().mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@paddle.no_grad()
def evaluate(vae, frames, batch_size=64):
    """PSNR of reconstructions through the posterior mean, and the std of sampled latents."""
    squared_error, latents = 0.0, []
    for start in range(0, len(frames), batch_size):
        x = to_model_input(frames[start : start + batch_size])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.mean).sample
        squared_error += float(((x - reconstruction.clip(-1, 1)) / 2).square().mean()) * len(x)
        latents.append(posterior.sample().numpy())
    mse = squared_error / len(frames)
    return 10 * math.log10(1.0 / max(mse, 1e-12)), float(np.concatenate(latents).std())


@paddle.no_grad()
def colour_report(vae, height, width):
    """Largest RGB distance (0-255) between input and reconstruction of: the mean colour of each palette
    object (every colour, shape and background of the toy world, over the pixels of the object's own colour),
    and the mean colour of frames filled with each palette or background colour."""
    objects, masks = [], []
    for colour, shape, background in itertools.product(synthetic.COLOURS, synthetic.SHAPES, synthetic.BACKGROUNDS):
        clip = synthetic.sample_clip(np.random.default_rng(0), (colour, shape, "right"), height, width)
        frame = synthetic.render_frame(dict(clip, background=background), 0, height, width)
        objects.append(frame)
        masks.append(np.all(frame == synthetic.COLOURS[colour], axis=-1))
    fills = [*synthetic.COLOURS.values(), *synthetic.BACKGROUNDS.values()]
    solids = np.stack([np.full((height, width, 3), rgb, np.uint8) for rgb in fills])

    def reconstruct(frames):
        x = to_model_input(np.stack(frames))
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample.clip(-1, 1)
        return ((decoded.numpy() + 1) * 127.5).transpose(0, 2, 3, 1)

    object_errors = [
        np.linalg.norm(out[mask].mean(0) - frame[mask].mean(0))
        for out, frame, mask in zip(reconstruct(objects), objects, masks)
    ]
    solid_errors = [np.linalg.norm(out.reshape(-1, 3).mean(0) - rgb) for out, rgb in zip(reconstruct(solids), fills)]
    return {"palette_object_max_error": float(max(object_errors)), "solid_frame_max_error": float(max(solid_errors))}


def checkpoint_dir(args):
    return os.path.abspath(args.output_dir).rstrip(os.sep) + ".partial"


# The flags a checkpoint must agree with to be resumed: everything that changes what the steps compute.
RESUME_KEYS = ("steps", "batch_size", "lr", "kl_weight", "colour_fraction", "lowpass_weight", "block_out_channels",
               "latent_channels", "warmup_steps", "init_from", "max_clips", "seed")


def save_checkpoint(vae, optimizer, step, args):
    """Weights, optimizer (with its learning-rate schedule) and step, replaced whole."""
    settings = {key: getattr(args, key) for key in RESUME_KEYS}
    with atomic_path(checkpoint_dir(args)) as tmp_dir:
        os.makedirs(tmp_dir)
        paddle.save(vae.state_dict(), os.path.join(tmp_dir, "vae.pdparams"))
        paddle.save(optimizer.state_dict(), os.path.join(tmp_dir, "optimizer.pdopt"))
        with open(os.path.join(tmp_dir, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"step": step, "settings": settings}, f)


def load_checkpoint(vae, optimizer, args):
    """The step to continue after (0 without a checkpoint); refuses a checkpoint made with other settings."""
    path = checkpoint_dir(args)
    if not os.path.isdir(path):
        return 0
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    settings = {key: getattr(args, key) for key in RESUME_KEYS}
    changed = sorted(key for key in RESUME_KEYS if state["settings"].get(key) != settings[key])
    if changed:
        raise UserError(f"{path}: a checkpoint made with other {', '.join('--' + k.replace('_', '-') for k in changed)}; "
                        "rerun with the same flags to resume, or delete it to start again")
    vae.set_state_dict(paddle.load(os.path.join(path, "vae.pdparams")))
    optimizer.set_state_dict(paddle.load(os.path.join(path, "optimizer.pdopt")))
    print(f"resuming after step {state['step']} from {path}", flush=True)
    return state["step"]


def train(vae, frames, args):
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(args.lr, T_max=args.steps, eta_min=args.lr * 0.01)
    if args.warmup_steps:
        # Adam's first updates move every weight by ~lr whatever its gradient, which wrecks a trained VAE.
        schedule = paddle.optimizer.lr.LinearWarmup(schedule, args.warmup_steps, start_lr=0.0, end_lr=args.lr)
    optimizer = paddle.optimizer.Adam(
        learning_rate=schedule,
        parameters=vae.parameters(),
        grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0),
    )
    first_step = load_checkpoint(vae, optimizer, args) + 1
    vae.train()
    start = time.time()
    for step in range(first_step, args.steps + 1):
        # Each step's draws depend on (seed, step) only, so a resumed run takes the steps an uninterrupted one does.
        rng = np.random.default_rng([args.seed, step])
        paddle.seed(args.seed * 1_000_003 + step)
        x = to_model_input(training_batch(rng, frames, args.batch_size, args.colour_fraction))
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        reconstruction_loss = (reconstruction - x).abs().mean() + (reconstruction - x).square().mean()
        # Mean colours over 8x8 blocks: a small object's colour error is a few pixels in the terms above.
        pooled_error = paddle.nn.functional.avg_pool2d(reconstruction - x, kernel_size=8)
        reconstruction_loss = reconstruction_loss + args.lowpass_weight * pooled_error.square().mean()
        # KL summed over a frame's latent, spread over its pixels like the reconstruction terms.
        kl_loss = posterior.kl().mean() / math.prod(x.shape[1:])
        loss = reconstruction_loss + args.kl_weight * kl_loss
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.time() - start
            done = step - first_step + 1
            print(
                f"step {step}/{args.steps} loss {float(loss):.5f} kl {float(kl_loss):.3f} "
                f"batch_psnr {psnr(x, reconstruction):.2f} dB lr {optimizer.get_lr():.2e} "
                f"{elapsed / done:.2f} s/step eta {elapsed / done * (args.steps - step) / 60:.1f} min",
                flush=True,
            )
        if step % args.checkpoint_every == 0 and step < args.steps:
            save_checkpoint(vae, optimizer, step, args)
    vae.eval()
    return time.time() - start


def main(argv):
    args = parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0 or args.checkpoint_every <= 0:
        raise UserError(f"--steps {args.steps} --batch-size {args.batch_size} --checkpoint-every {args.checkpoint_every}: "
                        "all must be positive")
    if not 0 <= args.colour_fraction <= 1:
        raise UserError(f"--colour-fraction {args.colour_fraction}: must be between 0 and 1")
    configure_cpu_runtime()
    paddle.seed(args.seed)
    started = time.time()
    train_frames = load_frames(os.path.join(args.data_dir, "train.csv"), args.max_clips)
    heldout_frames = load_frames(os.path.join(args.data_dir, "heldout.csv"))
    print(f"loaded {len(train_frames)} training and {len(heldout_frames)} held-out frames", flush=True)

    if args.init_from is None:
        config = dict(VAE_CONFIG)
        if args.block_out_channels is not None:
            levels = len(args.block_out_channels)
            config["block_out_channels"] = args.block_out_channels
            config["down_block_types"] = ["DownEncoderBlock2D"] * levels
            config["up_block_types"] = ["UpDecoderBlock2D"] * levels
        if args.latent_channels is not None:
            config["latent_channels"] = args.latent_channels
        vae = AutoencoderKL(**config)
    elif args.block_out_channels is not None or args.latent_channels is not None:
        raise UserError("--block-out-channels and --latent-channels shape a new VAE; leave them out with --init-from")
    elif os.path.isfile(os.path.join(args.init_from, "config.json")):
        vae = AutoencoderKL.from_pretrained(args.init_from)
    else:
        raise UserError(f"--init-from {args.init_from}: no saved VAE there (config.json missing); pass a VAE folder")
    training_seconds = train(vae, train_frames, args)
    heldout_psnr, latent_std = evaluate(vae, heldout_frames)
    # The latent scale is measured on training frames, as for Stable Diffusion's VAE.
    sample = train_frames[np.random.default_rng(args.seed + 1).integers(len(train_frames), size=1024)]
    train_psnr, train_latent_std = evaluate(vae, sample)
    vae.register_to_config(scaling_factor=1.0 / train_latent_std)
    report = {
        "heldout_psnr_db": round(heldout_psnr, 3),
        **{key: round(value, 2) for key, value in colour_report(vae, *train_frames.shape[1:3]).items()},
        "train_psnr_db": round(train_psnr, 3),
        "latent_std": train_latent_std,
        "heldout_latent_std": latent_std,
        "scaling_factor": 1.0 / train_latent_std,
        "init_from": args.init_from,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "kl_weight": args.kl_weight,
        "block_out_channels": list(vae.config.block_out_channels),
        "latent_channels": vae.config.latent_channels,
        "colour_fraction": args.colour_fraction,
        "lowpass_weight": args.lowpass_weight,
        "seed": args.seed,
        "num_training_frames": len(train_frames),
        "num_heldout_frames": len(heldout_frames),
        "training_minutes": round(training_seconds / 60, 2),
        "total_minutes": round((time.time() - started) / 60, 2),
    }
    with atomic_path(args.output_dir) as tmp_dir:
        vae.save_pretrained(tmp_dir, safe_serialization=True)
        with open(os.path.join(tmp_dir, "training_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    shutil.rmtree(checkpoint_dir(args), ignore_errors=True)
    print(json.dumps(report, indent=2))
    print(f"saved {args.output_dir}")


if __name__ == "__main__":
    run_cli(main)
