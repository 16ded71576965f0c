"""Encode a meta CSV's clips with the VAE once, for training on pre-encoded latents.

    python scripts/encode_latents.py --data-path data/train.csv --vae-path assets/default_model/vae \
        --num-frames 16 --image-size 64 64 --output-dir data/latents

Writes <output-dir>/latents.csv and one .npz per clip (posterior mean and std). Train on them with
`scripts/trainer_opensora.py --latent_data_path <output-dir>/latents.csv`. Clips are taken whole from their
first frame, so use it for data whose clips already have the training length and size.
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402


def main(argv):
    import argparse

    from dataset.datasets import VariableVideoTextDataset
    from dataset.latents import encode_dataset
    from models.families import load_vae
    from utils.runtime import configure_cpu_runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="meta CSV of the clips")
    parser.add_argument("--vae-path", required=True, help="ppdiffusers AutoencoderKL or v1.2 video VAE directory")
    parser.add_argument("--num-frames", type=int, required=True)
    parser.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("H", "W"))
    parser.add_argument("--frame-interval", type=int, default=1)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    configure_cpu_runtime()

    dataset = VariableVideoTextDataset(
        args.data_path, frame_interval=args.frame_interval, num_frames=args.num_frames,
        image_size=tuple(args.image_size), random_start=False,
    )
    vae = load_vae(args.vae_path)
    csv_path = encode_dataset(dataset, vae, args.output_dir, os.path.join(args.output_dir, "latents.csv"), args.batch_size)
    print(csv_path)


if __name__ == "__main__":
    run_cli(main)
