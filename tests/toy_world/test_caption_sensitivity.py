import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest

from toy_world import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("caption_sensitivity", os.path.join(REPO, "toy_world", "caption_sensitivity.py"))
caption_sensitivity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(caption_sensitivity)


def test_each_variant_changes_exactly_one_attribute():
    variants = caption_sensitivity.changed_captions(["a red circle moving left on a dark background",
                                                     "a white square moving up on a navy background"])
    assert variants == {
        "true": ["a red circle moving left on a dark background", "a white square moving up on a navy background"],
        "opposite_direction": ["a red circle moving right on a dark background",
                               "a white square moving down on a navy background"],
        "perpendicular_direction": ["a red circle moving up on a dark background",
                                    "a white square moving right on a navy background"],
        "other_colour": ["a green circle moving left on a dark background",
                         "a red square moving up on a navy background"],
    }
    short = caption_sensitivity.changed_captions(["on a gray background, a blue square heading down", "red circle going up"])
    assert short["opposite_direction"] == ["on a gray background, a blue square heading up", "red circle going down"]
    assert short["other_colour"] == ["on a gray background, a yellow square heading down", "green circle going up"]


@pytest.fixture(scope="module")
def tiny_parts(tiny_models):
    from models.stdit.stdit2 import STDiT2
    from models.text_encoder.t5 import T5Encoder
    from schedulers.rflow import RFLOW

    model = STDiT2.from_pretrained(tiny_models["stdit2"])
    # The original initialisation zeroes the output layer and the cross-attention projections, which would
    # make every caption give the same loss; draw all weights instead.
    paddle.seed(3)
    for parameter in model.parameters():
        parameter.set_value(paddle.randn(parameter.shape) * 0.1)
    model.eval()
    text_encoder = T5Encoder.from_pretrained(tiny_models["text_encoder"], model_max_length=model.config.model_max_length)
    latents = paddle.randn([2, 4, 4, 8, 8])
    sizes = {key: paddle.to_tensor([value] * 2, dtype="float32")
             for key, value in dict(num_frames=4, height=64, width=64, ar=1.0, fps=8).items()}
    texts = ["a red circle moving left on a dark background", "a blue square moving down on a gray background"]
    return model, text_encoder, RFLOW(), latents, texts, sizes


def test_a_model_that_reads_the_caption_has_different_losses(tiny_parts):
    rows = caption_sensitivity.caption_losses(*tiny_parts, noise_levels=(0.5, 0.9))
    assert [(row["noise_level"], row["first_frame_given"]) for row in rows] == [(0.5, False), (0.9, False), (0.5, True), (0.9, True)]
    for row in rows:
        values = [row[name] for name in ("true", "opposite_direction", "perpendicular_direction", "other_colour")]
        assert all(np.isfinite(values)) and all(abs(v - row["true"]) > 1e-6 for v in values[1:])
    # Fixed noise: the same call gives the same numbers.
    assert caption_sensitivity.caption_losses(*tiny_parts, noise_levels=(0.5, 0.9)) == rows


def test_a_model_without_cross_attention_output_has_equal_losses(tiny_parts):
    model = tiny_parts[0]
    saved = {}
    for block in model.blocks:
        for parameter in (block.cross_attn.proj.weight, block.cross_attn.proj.bias):
            saved[parameter.name] = parameter.numpy()
            parameter.set_value(paddle.zeros(parameter.shape))
    try:
        rows = caption_sensitivity.caption_losses(*tiny_parts, noise_levels=(0.9,))
    finally:
        for block in model.blocks:
            for parameter in (block.cross_attn.proj.weight, block.cross_attn.proj.bias):
                parameter.set_value(paddle.to_tensor(saved[parameter.name]))
    for row in rows:
        assert row["opposite_direction"] == pytest.approx(row["true"], rel=1e-6)
        assert row["other_colour"] == pytest.approx(row["true"], rel=1e-6)


def test_command_writes_the_table_and_refuses_iddpm_models(tmp_path, tiny_models):
    synthetic.write_dataset(tmp_path / "data", num_clips=3, num_heldout_clips_per_combination=0, num_frames=4)
    flags = ["--vae-path", tiny_models["vae"], "--text-encoder-path", tiny_models["text_encoder"],
             "--data-path", str(tmp_path / "data" / "train.csv"), "--num-clips", "2"]
    result = subprocess.run(
        [sys.executable, "toy_world/caption_sensitivity.py", "--model-path", tiny_models["stdit2"], *flags,
         "--output", str(tmp_path / "out.json")], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["num_clips"] == 2 and len(report["rows"]) == 2 * len(caption_sensitivity.NOISE_LEVELS)
    assert all(np.isfinite(row["true"]) for row in report["rows"])
    assert "opposite_direction" in result.stdout.splitlines()[-2 - len(report["rows"])]

    iddpm_model = tmp_path / "iddpm_model"
    shutil.copytree(tiny_models["stdit2"], iddpm_model)
    defaults = json.loads((iddpm_model / "inference.json").read_text())
    (iddpm_model / "inference.json").write_text(json.dumps(dict(defaults, sampler="iddpm")))
    result = subprocess.run(
        [sys.executable, "toy_world/caption_sensitivity.py", "--model-path", str(iddpm_model), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "rflow models only" in result.stderr.strip().splitlines()[-1]
