import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("train_vae", os.path.join(REPO, "toy_world", "train_vae.py"))
train_vae = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_vae)


def test_batches_mix_toy_frames_and_random_colour_frames():
    toy = np.stack([np.full((16, 16, 3), value, np.uint8) for value in range(10)])  # frame i is filled with i
    rng = np.random.default_rng(0)
    only_toy = train_vae.training_batch(rng, toy, 64, colour_fraction=0.0)
    assert all((frame == frame[0, 0, 0]).all() and frame[0, 0, 0] < 10 for frame in only_toy)
    only_colour = train_vae.training_batch(rng, toy, 64, colour_fraction=1.0)
    assert not any((frame == frame[0, 0, 0]).all() and frame[0, 0, 0] < 10 for frame in only_colour)
    half = train_vae.training_batch(rng, toy, 400, colour_fraction=0.5)
    from_toy = sum((frame == frame[0, 0, 0]).all() and frame[0, 0, 0] < 10 for frame in half)
    assert 150 < from_toy < 250


def test_random_colour_frames_cover_saturated_colours():
    rng = np.random.default_rng(1)
    pixels = np.concatenate([train_vae.random_colour_frame(rng, 32, 32).reshape(-1, 3) for _ in range(200)]).astype(int)
    # Saturated red, green and blue all occur, which toy frames show in 5% of their pixels at most.
    for channel in range(3):
        others = [c for c in range(3) if c != channel]
        assert ((pixels[:, channel] > 180) & (pixels[:, others].max(axis=1) < 80)).mean() > 0.005


class ShiftingVae:
    """Stands in for an AutoencoderKL: the latent is the image, and decoding adds `shift` to the red channel."""

    def __init__(self, shift):
        self.shift = shift

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        shifted = z.clone()
        shifted[:, 0] = shifted[:, 0] + self.shift
        return SimpleNamespace(sample=shifted)


def test_colour_report_measures_the_colour_shift():
    assert train_vae.colour_report(ShiftingVae(0.0), 64, 64) == pytest.approx(
        {"palette_object_max_error": 0.0, "solid_frame_max_error": 0.0}, abs=1e-3
    )
    # A shift of 0.2 in [-1, 1] is 25.5 of 255 wherever the red channel is not clipped at 255.
    report = train_vae.colour_report(ShiftingVae(0.2), 64, 64)
    assert report["palette_object_max_error"] == pytest.approx(25.5, abs=0.1)
    assert report["solid_frame_max_error"] == pytest.approx(25.5, abs=0.1)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from safetensors.numpy import load_file

    from toy_world.synthetic import write_dataset

    write_dataset(str(tmp_path / "data"), num_clips=2, num_frames=2, size=(32, 32), num_heldout_clips_per_combination=0)
    # the held-out split must list a clip: reuse the training one
    (tmp_path / "data" / "heldout.csv").write_text((tmp_path / "data" / "train.csv").read_text())

    def command(output):
        return [sys.executable, os.path.join(REPO, "toy_world", "train_vae.py"), "--data-dir", str(tmp_path / "data"),
                "--output-dir", str(output), "--steps", "6", "--batch-size", "2", "--block-out-channels", "8", "16",
                "--latent-channels", "2", "--checkpoint-every", "2", "--log-every", "1"]

    straight = subprocess.run(command(tmp_path / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-2000:]

    process = subprocess.Popen(command(tmp_path / "resumed"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:  # kill -9 right after the step-4 checkpoint is written
        if line.startswith("step 5/6"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert (tmp_path / "resumed.partial" / "state.json").is_file() and not (tmp_path / "resumed").exists()
    import shutil

    shutil.copytree(tmp_path / "resumed.partial", tmp_path / "other.partial")
    resumed = subprocess.run(command(tmp_path / "resumed"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after step 4" in resumed.stdout
    assert not (tmp_path / "resumed.partial").exists()
    weights = [load_file(str(tmp_path / name / "diffusion_paddle_model.safetensors")) for name in ("straight", "resumed")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        np.testing.assert_array_equal(weights[0][key], weights[1][key], err_msg=key)

    other = subprocess.run(command(tmp_path / "other") + ["--lr", "0.01"], capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "a checkpoint made with other --lr" in other.stderr
