"""The five commands of the original documentation, run as written (plus a model and an output folder)."""

import os
import shlex
import subprocess
import sys

import av
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (command as documented, expected frames, expected height, expected width)
DOCUMENTED = [
    ("""scripts/inference.py --prompt "A beautiful sunset over the city" --num-frames 16 --image-size 256 256""", 16, 256, 256),
    ("""scripts/inference-long.py --num-frames 20 --image-size 224 300 --sample-name image-cond --prompt 'A breathtaking sunrise scene.{"reference_path": "assets/images/condition/wave.png","mask_strategy": "0"}'""", 20, 224, 296),
    ("""scripts/inference-long.py --num-frames 18 --image-size 224 300 --sample-name connect --prompt 'A breathtaking sunrise scene.{"reference_path": "assets/images/condition/sunset1.png;assets/images/condition/sunset2.png","mask_strategy": "0;0,1,0,-1,1"}'""", 18, 224, 296),
    ("""scripts/inference-long.py --num-frames 12 --image-size 240 240 --sample-name video_extend --prompt 'A car driving on the ocean.{"reference_path": "./assets/videos/d0_proc.mp4","mask_strategy": "0,0,0,-6,6"}'""", 12, 240, 240),
    ("""scripts/inference-long.py --num-frames 7 --image-size 256 256 --sample-name edit --prompt 'A cyberpunk-style car at New York city.{"reference_path": "./assets/videos/d0_proc.mp4","mask_strategy": "0,0,0,0,7,0.4"}'""", 7, 256, 256),
]


def run_documented(command, extra, tmp_path):
    argv = [sys.executable, *shlex.split(command), "--save-dir", str(tmp_path), "--quiet", *extra]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = result.stdout.strip().splitlines()
    assert len(paths) == 1 and os.path.isfile(paths[0]), result.stdout
    return paths[0], result.stderr


def probe(path):
    with av.open(path) as container:
        frames = [frame for frame in container.decode(video=0)]
    return len(frames), frames[0].height, frames[0].width


@pytest.mark.parametrize("command,frames,height,width", DOCUMENTED, ids=["t2v", "image-cond", "connect", "extend", "edit"])
def test_documented_command_with_tiny_model(command, frames, height, width, tiny_model_flags, tmp_path):
    path, stderr = run_documented(command, tiny_model_flags, tmp_path)
    assert probe(path) == (frames, height, width)
    if width == 296:
        assert "300" in stderr and "296" in stderr  # the rounding is announced


@pytest.mark.slow
@pytest.mark.parametrize("command,frames,height,width", DOCUMENTED, ids=["t2v", "image-cond", "connect", "extend", "edit"])
def test_documented_command_with_shipped_model(command, frames, height, width, tmp_path):
    path, _ = run_documented(command, [], tmp_path)
    assert probe(path) == (frames, height, width)
