"""Build the training meta CSV from a folder of videos (and images) and their captions.

    python scripts/make_meta.py --video-dir my_videos/ --captions captions.csv --output my_videos/meta.csv
    python scripts/make_meta.py --video-dir my_videos/ --output my_videos/meta.csv   # captions in <name>.txt

captions.csv has the columns path,text with paths relative to --video-dir. Frames, size and fps are probed
with PyAV; unreadable or uncaptioned files are skipped and counted.
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import UserError, run_cli  # noqa: E402


def main(argv):
    import argparse

    from dataset.meta import build_meta, write_meta

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video-dir", required=True, help="folder searched recursively for videos and images")
    parser.add_argument("--captions", help="CSV with columns path,text (default: a .txt next to each file)")
    parser.add_argument("--output", required=True, help="meta CSV to write")
    args = parser.parse_args(argv)
    rows, unreadable, uncaptioned = build_meta(args.video_dir, args.captions)
    if not rows:
        raise UserError(f"--video-dir {args.video_dir}: no readable, captioned videos found ({len(unreadable)} unreadable, "
                        f"{len(uncaptioned)} without caption)")
    write_meta(rows, args.output, args.video_dir)
    print(f"{args.output}: {len(rows)} clips; skipped {len(unreadable)} unreadable and {len(uncaptioned)} uncaptioned files")
    for path in unreadable[:10]:
        print(f"  unreadable: {path}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
