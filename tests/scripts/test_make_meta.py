import csv
import os
import subprocess
import sys

import numpy as np

from dataset.datasets import VariableVideoTextDataset
from utils.media import encode_mp4

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_make_meta_probes_videos_and_skips_a_broken_one(tmp_path):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    frames = np.zeros((6, 32, 48, 3), dtype=np.uint8)
    (videos / "a.mp4").write_bytes(encode_mp4(frames, 10))
    (videos / "sub" / "b.mp4").write_bytes(encode_mp4(frames[:4], 5))
    (videos / "broken.mp4").write_bytes(encode_mp4(frames, 10)[:200])
    (videos / "nocaption.mp4").write_bytes(encode_mp4(frames, 10))
    captions = tmp_path / "captions.csv"
    captions.write_text("path,text\na.mp4,first clip\nsub/b.mp4,second clip\nbroken.mp4,broken clip\n")
    out = tmp_path / "meta" / "meta.csv"
    result = subprocess.run([sys.executable, "scripts/make_meta.py", "--video-dir", str(videos), "--captions", str(captions),
                             "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2 clips; skipped 1 unreadable and 1 uncaptioned" in result.stdout
    rows = list(csv.DictReader(open(out)))
    assert [(r["path"], r["text"], r["num_frames"], r["height"], r["width"], float(r["fps"])) for r in rows] == [
        ("../videos/a.mp4", "first clip", "6", "32", "48", 10.0),
        ("../videos/sub/b.mp4", "second clip", "4", "32", "48", 5.0),
    ]
    # the CSV is what the training data set reads
    dataset = VariableVideoTextDataset(str(out), num_frames=4, image_size=(32, 32))
    assert dataset[1]["video"].shape == (3, 4, 32, 32) and dataset[1]["fps"] == 5.0


def test_make_meta_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "scripts/make_meta.py", "--video-dir", str(tmp_path / "none"), "--output", str(tmp_path / "m.csv")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert not (tmp_path / "m.csv").exists()
