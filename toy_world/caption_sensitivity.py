"""How much a toy-world STDiT2 listens to each attribute of its caption.

    python toy_world/caption_sensitivity.py --data-path data/synthetic/train.csv --num-clips 48

For clips of the toy world (toy_world/synthetic.py) it computes the model's diffusion loss with the true caption
and with the caption changed in one attribute: the opposite direction, a perpendicular direction, another
colour. Noise and noise levels are fixed, so the columns differ only by the caption. A model that uses a word
has a clearly higher loss when the word is wrong; equal losses mean the word is ignored. Each noise level is
measured twice: text to video, and with the first frame given clean (as in image-to-video), where the
caption's direction alone decides where the object goes next. Rectified-flow models only (the shipped one
and those trained with --sampler rflow).
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402

NOISE_LEVELS = (0.3, 0.6, 0.8, 0.9, 0.95, 0.99)
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PERPENDICULAR = {"left": "up", "right": "down", "up": "right", "down": "left"}


def changed_captions(texts):
    """{variant name: captions}, each variant changing one attribute of every caption."""
    from toy_world import synthetic

    colours = list(synthetic.COLOURS)

    def rewrite(text, key, new_value):
        """The caption with one attribute word replaced, worded as before."""
        old = synthetic.parse_caption(text)[key]
        return " ".join(new_value(old) if word == old else word for word in text.split(" "))

    return {
        "true": list(texts),
        "opposite_direction": [rewrite(t, "direction", OPPOSITE.get) for t in texts],
        "perpendicular_direction": [rewrite(t, "direction", PERPENDICULAR.get) for t in texts],
        "other_colour": [rewrite(t, "colour", lambda c: colours[(colours.index(c) + 1) % len(colours)]) for t in texts],
    }


def caption_losses(model, text_encoder, scheduler, latents, texts, sizes, noise_levels=NOISE_LEVELS, seed=0):
    """Rows {"noise_level", "first_frame_given", <variant>: mean loss} for every noise level, both settings."""
    import paddle

    paddle.seed(seed)
    noise = paddle.randn(latents.shape, dtype=latents.dtype)
    encoded = {name: text_encoder.encode(captions) for name, captions in changed_captions(texts).items()}
    # Frame mask of the scheduler: True = generated; frame 0 is given clean.
    generated_frames = paddle.ones([latents.shape[0], latents.shape[2]], dtype="bool")
    generated_frames[:, 0] = False
    rows = []
    with paddle.no_grad():
        for anchored in (False, True):
            for level in noise_levels:
                t = paddle.full([latents.shape[0]], level * scheduler.num_timesteps, dtype="float32")
                row = {"noise_level": level, "first_frame_given": anchored}
                for name, text in encoded.items():
                    model_kwargs = dict(y=text["y"], mask=text["mask"], **sizes)
                    losses = scheduler.training_losses(
                        model, latents, model_kwargs, mask=generated_frames if anchored else None, t=t, noise=noise
                    )
                    row[name] = float(losses["loss"].mean())
                rows.append(row)
    return rows


def main(argv):
    import argparse
    import json

    import numpy as np
    import paddle

    from dataset.datasets import VariableVideoTextDataset
    from models.stdit.stdit2 import STDiT2
    from models.text_encoder.t5 import T5Encoder
    from models.vae.vae import VideoAutoencoderKL
    from schedulers.rflow import RFLOW
    from trainer.trainer import size_conditions
    from pipelines.open_sora.settings import DEFAULT_MODEL_DIR, OPEN_SORA_DEFAULTS, read_model_defaults, transformer_dir
    from utils.errors import UserError
    from utils.io import write_text_atomic
    from utils.runtime import configure_cpu_runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="meta CSV of toy-world clips (toy_world/make_synthetic_data.py)")
    parser.add_argument("--model-path", default=DEFAULT_MODEL_DIR, help="STDiT2 or pipeline directory")
    parser.add_argument("--vae-path", default=os.path.join(DEFAULT_MODEL_DIR, "vae"))
    parser.add_argument("--text-encoder-path", default=os.path.join(DEFAULT_MODEL_DIR, "text_encoder"))
    parser.add_argument("--num-clips", type=int, default=48, help="clips spread evenly over the CSV")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.num_clips <= 0:
        raise UserError(f"--num-clips {args.num_clips}: must be positive")
    configure_cpu_runtime()

    defaults = {**OPEN_SORA_DEFAULTS, **read_model_defaults(args.model_path)}
    if defaults["sampler"] != "rflow":
        raise UserError(
            f"{args.model_path}: not a rectified-flow model (its sampler is {defaults['sampler']!r}); "
            "caption_sensitivity.py measures rflow models only"
        )
    dataset = VariableVideoTextDataset(
        args.data_path, num_frames=defaults["num_frames"], image_size=tuple(defaults["image_size"]), random_start=False
    )
    indices = np.linspace(0, len(dataset) - 1, min(args.num_clips, len(dataset))).round().astype(int)
    samples = [dataset[int(i)] for i in indices]

    vae = VideoAutoencoderKL.from_pretrained(args.vae_path)
    model = STDiT2.from_pretrained(transformer_dir(args.model_path))
    model.eval()
    text_encoder = T5Encoder.from_pretrained(args.text_encoder_path, model_max_length=model.config.model_max_length)
    mean, _ = vae.posterior(paddle.to_tensor(np.stack([s["video"] for s in samples])))
    latents = mean * vae.scaling_factor
    batch = {key: [s[key] for s in samples] for key in ("num_frames", "height", "width", "ar", "fps")}
    scheduler = RFLOW()
    rows = caption_losses(model, text_encoder, scheduler, latents, [s["text"] for s in samples],
                          size_conditions(batch), seed=args.seed)

    columns = [key for key in rows[0] if key not in ("noise_level", "first_frame_given")]
    width = max(len(name) for name in columns) + 2
    print(f"{'first frame':<12}{'t':>6}" + "".join(f"{name:>{width}}" for name in columns))
    for row in rows:
        given = "given" if row["first_frame_given"] else "-"
        print(f"{given:<12}{row['noise_level']:>6}" + "".join(f"{row[name]:>{width}.4f}" for name in columns))
    if args.output:
        write_text_atomic(args.output, json.dumps({"num_clips": len(samples), "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    run_cli(main)
