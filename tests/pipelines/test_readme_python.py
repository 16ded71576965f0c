"""The Python blocks of README run as written, one after the other, as a user pasting them would run them."""

import os
import re
import subprocess
import sys

import av

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_python_examples_run_and_write_the_video(tmp_path):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 2
    # Run from a copy of the repository root's layout, so the example's output lands in tmp_path.
    os.symlink(os.path.join(REPO, "assets"), tmp_path / "assets")
    script = "\n".join(blocks) + "\nprint(output.frames.shape)\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "(5, 16, 64, 64, 3)"
    with av.open(str(tmp_path / "red_circle.mp4")) as container:
        frames = list(container.decode(video=0))
    assert (len(frames), frames[0].height, frames[0].width) == (16, 64, 64)
