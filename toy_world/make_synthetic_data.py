"""Render the captioned toy video data set (moving coloured shapes) used to train the demo model.

    python toy_world/make_synthetic_data.py --output-dir /work/data/synthetic --num-clips 2000 --seed 0
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import time

from toy_world import synthetic
from utils.errors import run_cli


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="folder for train.csv, heldout.csv and videos/")
    parser.add_argument("--num-clips", type=int, default=2000, help="number of training clips")
    parser.add_argument(
        "--num-heldout-per-combination", type=int, default=3, help="held-out clips per held-out combination"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-frames", type=int, default=synthetic.DEFAULT_NUM_FRAMES)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=list(synthetic.DEFAULT_SIZE))
    parser.add_argument("--fps", type=int, default=synthetic.DEFAULT_FPS)
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    start = time.time()
    train_csv, heldout_csv = synthetic.write_dataset(
        args.output_dir,
        num_clips=args.num_clips,
        num_heldout_clips_per_combination=args.num_heldout_per_combination,
        seed=args.seed,
        num_frames=args.num_frames,
        size=tuple(args.size),
        fps=args.fps,
    )
    print(f"wrote {train_csv} and {heldout_csv} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    run_cli(main)
