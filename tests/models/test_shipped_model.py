"""The model shipped in assets/default_model loads through the same code as converted checkpoints."""

import json
import os
import subprocess
import sys

import av
import numpy as np
import paddle
import pytest

from dataset import synthetic
from models.stdit.stdit2 import STDiT2
from models.text_encoder.t5 import T5Encoder
from models.vae.vae import VideoAutoencoderKL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(REPO, "assets", "default_model")
SIZE_LIMIT_MB = 25


def test_shipped_weights_are_small_and_complete():
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(SHIPPED) for f in files)
    assert total < SIZE_LIMIT_MB * 2**20
    defaults = json.load(open(os.path.join(SHIPPED, "stdit2", "inference.json")))
    assert defaults["sampler"] == "rflow" and defaults["num_frames"] == 16 and defaults["image_size"] == [64, 64]


def test_shipped_models_load_and_give_finite_outputs():
    model = STDiT2.from_pretrained(os.path.join(SHIPPED, "stdit2"))
    model.eval()
    vae = VideoAutoencoderKL(os.path.join(SHIPPED, "vae"))
    text_encoder = T5Encoder(os.path.join(SHIPPED, "text_encoder"), model_max_length=model.config.model_max_length)
    text = text_encoder.encode(["a red circle moving left on a black background"])
    assert text["y"].shape == [1, 1, model.config.model_max_length, model.config.caption_channels]
    z = paddle.randn([1, vae.out_channels, 16, 8, 8])
    size = {k: paddle.full([1], v) for k, v in dict(num_frames=16.0, height=64.0, width=64.0, ar=1.0, fps=8.0).items()}
    with paddle.no_grad():
        out = model(z, paddle.full([1], 500.0), text["y"], mask=text["mask"], **size)
    assert out.shape == [1, 4, 16, 8, 8] and np.isfinite(out.numpy()).all()
    video = vae.decode(out[:, :, :2])
    assert video.shape == [1, 3, 2, 64, 64] and np.isfinite(video.numpy()).all()


def test_default_command_with_few_steps(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/inference.py", "--prompt", "a blue square moving up on a gray background",
         "--num-sampling-steps", "3", "--save-dir", str(tmp_path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with av.open(result.stdout.strip()) as container:
        frames = list(container.decode(video=0))
    assert (len(frames), frames[0].height, frames[0].width) == (16, 64, 64)


@pytest.mark.slow
def test_evaluation_script_on_a_few_prompts(tmp_path):
    output = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "scripts/evaluate.py", "--num-prompts", "2", "--seeds", "3", "4", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(output.read_text())
    assert set(results) == {"t2v", "t2v_samples", "image_condition", "connect", "extend", "edit"}
    held_out = {tuple(combo) for combo in synthetic.HELD_OUT_COMBINATIONS}
    for name, entry in results["t2v_samples"].items():
        assert len(entry["samples"]) == 2 and entry["seed"] in (3, 4)
        for sample in entry["samples"]:
            parsed = synthetic.parse_caption(sample["prompt"])
            assert (parsed["background"] is None) == (entry["kind"] == "short")
            assert ((parsed["colour"], parsed["shape"], parsed["direction"]) in held_out) == (entry["group"] == "held_out")
    seen_short = results["t2v"]["seen_short"]
    samples = [s for e in results["t2v_samples"].values() if (e["group"], e["kind"]) == ("seen", "short") for s in e["samples"]]
    assert seen_short["prompts"] == len(samples) == 4
    assert seen_short["colour_accuracy"] == np.mean([s["colour_correct"] for s in samples])
    assert seen_short["lenient_direction_accuracy"] == np.mean([s["lenient_direction_correct"] for s in samples])
    image_condition = results["image_condition"]
    assert image_condition["psnr_conditioned_frame"] > 20
    assert image_condition["direction_accuracy"] == np.mean([s["direction_correct"] for s in image_condition["samples"]])
