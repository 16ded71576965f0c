"""Conditioned and long video generation: image-to-video, connecting, extending, editing, looping.

    python scripts/inference-long.py --num-frames 20 --image-size 224 300 --sample-name image-cond \
        --prompt 'A breathtaking sunrise scene.{"reference_path": "assets/images/condition/wave.png","mask_strategy": "0"}'

A prompt's JSON tail gives `reference_path` (';'-separated images/videos) and `mask_strategy`
(';'-separated groups loop_id,m_id,m_ref_start,m_target_start,m_length,edit_ratio); see README.
`--loop N` chains N clips, each conditioned on the last --condition-frame-length frames of the previous one.
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
