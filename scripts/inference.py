"""Text-to-video with STDiT2.

    python scripts/inference.py --prompt "a red circle moving right on a dark background"
    python scripts/inference.py --prompt "A beautiful sunset over the city" --num-frames 16 --image-size 256 256

With no model flags the small model shipped in assets/default_model is used, at the size, length, sampler
and step count it was trained with. Prompts may carry image/video conditioning as in
scripts/inference-long.py; see README for the mask_strategy syntax.
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402


def main(argv):
    from pipelines.open_sora.cli import run_inference

    run_inference(argv, description=__doc__.strip().splitlines()[0])


if __name__ == "__main__":
    run_cli(main)
