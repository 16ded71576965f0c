"""kill -9 at any moment loses nothing: the run resumes from the newest complete checkpoint and ends with the
same weights as an uninterrupted run; a torn checkpoint is reported and skipped. Divergence stops cleanly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from toy_world.synthetic import write_dataset
from trainer.trainer import checkpoints_to_delete

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("clips")), num_clips=8, num_frames=4, num_heldout_clips_per_combination=0)[0]


def command(tiny_models, clips, output_dir, max_steps=6, extra=()):
    return [sys.executable, "scripts/trainer_opensora.py", "--do_train", "--output_dir", str(output_dir), "--max_steps", str(max_steps),
            "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--seed", "3",
            "--learning_rate", "1e-3", "--report_to", "none", "--data_path", clips, "--num_frames", "4", "--image_size", "64", "64",
            "--pretrained_model_path", tiny_models["stdit2"], "--vae_path", tiny_models["vae"], "--text_encoder_path",
            tiny_models["text_encoder"], "--sampler", "rflow", "--dataloader_num_workers", "0", *extra]


def kill_when(process, condition, timeout=300):
    deadline = time.time() + timeout
    while not condition() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def straight(tiny_models, clips, tmp_path_factory):
    """Checkpoints of an uninterrupted run, the reference every interrupted run must end at."""
    output_dir = tmp_path_factory.mktemp("straight")
    subprocess.run(command(tiny_models, clips, output_dir), cwd=REPO, check=True, capture_output=True, timeout=600)
    return output_dir


def tag_complete_checkpoints(output_dir):
    """Write each complete checkpoint's own name into its trainer state; the run that resumes carries the tag of
    the state it loaded into its later checkpoints, which tells the checkpoints apart by content."""
    tags = []
    for checkpoint in sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1])):
        if (checkpoint / "checkpoint_complete").exists():
            state = json.loads((checkpoint / "trainer_state.json").read_text())
            state["log_history"][0]["test_tag"] = checkpoint.name
            (checkpoint / "trainer_state.json").write_text(json.dumps(state))
            tags.append(checkpoint.name)
    return tags


@pytest.mark.parametrize("kill_point", ["while saving checkpoint-4", "while training after checkpoint-2", "while training after checkpoint-4"])
def test_kill_then_resume_matches_uninterrupted(kill_point, tiny_models, clips, straight, tmp_path):
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(command(tiny_models, clips, interrupted), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_point == "while saving checkpoint-4":
        kill_when(process, lambda: (interrupted / "checkpoint-4").exists())
        torn = interrupted / "checkpoint-4"
        if torn.exists():  # make sure it is torn, whatever moment the kill hit
            (torn / "checkpoint_complete").unlink(missing_ok=True)
            for name in os.listdir(torn):
                if name.endswith(".pdparams"):
                    (torn / name).write_bytes((torn / name).read_bytes()[:100])
    elif kill_point == "while training after checkpoint-2":
        kill_when(process, lambda: (interrupted / "checkpoint-2" / "checkpoint_complete").exists())
    else:
        kill_when(process, lambda: (interrupted / "checkpoint-4" / "checkpoint_complete").exists())
        shutil.rmtree(interrupted / "checkpoint-6", ignore_errors=True)  # in case the run got that far before the kill
        assert (interrupted / "checkpoint-4" / "checkpoint_complete").exists()
    assert (interrupted / "checkpoint-2" / "checkpoint_complete").exists()
    tags = tag_complete_checkpoints(interrupted)
    if kill_point == "while training after checkpoint-4":
        assert tags == ["checkpoint-2", "checkpoint-4"]

    resumed = subprocess.run(command(tiny_models, clips, interrupted), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resuming from" in log and tags[-1] in log
    if kill_point == "while saving checkpoint-4":
        assert "checkpoint-4 is incomplete" in log
    final_state = json.loads((interrupted / "checkpoint-6" / "trainer_state.json").read_text())
    assert final_state["global_step"] == 6 and final_state["log_history"][0].get("test_tag") == tags[-1]
    a = load_file(str(interrupted / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(straight / "checkpoint-6" / "model.safetensors"))
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_diverging_training_stops_with_the_likely_causes(tiny_models, clips, tmp_path):
    result = subprocess.run(command(tiny_models, clips, tmp_path / "out", max_steps=20, extra=("--learning_rate", "1e25", "--max_nonfinite_steps", "3")),
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training diverged: 3 consecutive steps")
    assert "bf16" in errors[0] and "learning_rate" in errors[0] and "Traceback" not in result.stderr
    assert "skipping the update" in result.stdout + result.stderr


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, False), (6, True), (8, True), (10, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "checkpoint_complete").write_text(f"{step}\n")
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: never touched
    names = lambda limit: [os.path.basename(p) for p in checkpoints_to_delete(str(tmp_path), limit)]
    # 10 is torn but newer than every complete one: it may be the save in progress, so it stays
    assert names(1) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert names(2) == ["checkpoint-2", "checkpoint-4"]
    assert names(3) == names(5) == names(None) == names(0) == []
