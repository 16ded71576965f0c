"""The model shipped in assets/default_model loads through the same code as converted checkpoints."""

import json
import os
import subprocess
import sys

import av
import numpy as np
import paddle
import pytest

from toy_world import synthetic
from models.text_encoder.t5 import T5Encoder
from models.vae.vae import VideoAutoencoderKL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(REPO, "assets", "default_model")
SIZE_LIMIT_MB = 25


def test_shipped_weights_are_small_and_complete():
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(SHIPPED) for f in files)
    assert total < SIZE_LIMIT_MB * 2**20
    index = json.load(open(os.path.join(SHIPPED, "model_index.json")))
    assert (index["_class_name"], index["num_frames"], index["height"], index["width"], index["fps"]) == ("OpenSoraPipeline", 16, 64, 64, 8)
    scheduler = json.load(open(os.path.join(SHIPPED, "scheduler", "scheduler_config.json")))
    assert (scheduler["_class_name"], scheduler["use_timestep_transform"], scheduler["transform_scale"]) == ("RFLOW", True, 6.0)


@pytest.fixture(scope="module")
def shipped():
    from pipelines import OpenSoraPipeline

    return OpenSoraPipeline.from_pretrained(SHIPPED)


def test_shipped_model_predicts_the_velocity_of_a_training_clip(shipped):
    """On a clip of its own toy world, noised half-way, the shipped STDiT2's velocity is far closer to the true
    one (x0 - noise) than a zero prediction is, and its VAE reconstructs the clip."""
    clip = synthetic.sample_clip(np.random.default_rng(3), ("blue", "square", "up"), 64, 64)
    frames = synthetic.render_clip(clip, 16, 64, 64)
    video = paddle.to_tensor(frames.transpose(3, 0, 1, 2)[None].astype("float32") / 127.5 - 1.0)
    x0 = shipped.vae.encode(video, sample_posterior=False)
    reconstruction = ((shipped.vae.decode(x0)[0].numpy().clip(-1, 1) + 1) * 127.5).transpose(1, 2, 3, 0)
    assert 10 * np.log10(255**2 / np.mean((reconstruction - frames) ** 2)) > 20
    caption = synthetic.caption(clip["colour"], clip["shape"], clip["direction"], clip["background"])
    encoder = T5Encoder(shipped.text_encoder, shipped.tokenizer, shipped.transformer.config.model_max_length)
    text = encoder.encode([caption])
    size = {k: paddle.full([1], v) for k, v in dict(num_frames=16.0, height=64.0, width=64.0, ar=1.0, fps=8.0).items()}
    errors = []
    for seed in range(3):
        paddle.seed(seed)
        noise = paddle.randn(x0.shape)
        t = paddle.full([1], 500.0)
        with paddle.no_grad():
            velocity = shipped.transformer(shipped.scheduler.add_noise(x0, noise, t), t, text["y"], mask=text["mask"], **size)
        target = (x0 - noise).numpy()
        errors.append(np.mean((velocity.numpy()[:, :4] - target) ** 2) / np.mean(target**2))
    assert max(errors) < 0.5, errors


# Issue 14: the VAE shipped before v2 turns red into orange-brown and solid colour frames into grey. The
# marks below come off when a VAE that keeps colours ships (strict: a passing test then fails the run).
OLD_VAE_SHIFTS_COLOURS = pytest.mark.xfail(
    strict=True, reason="issue 14: the shipped VAE (trained on toy frames only) shifts object colours"
)


def round_trip(vae, frames):
    """uint8 frames [N, H, W, 3] -> encode (posterior mean) -> decode -> float frames in [0, 255]."""
    video = paddle.to_tensor(frames.transpose(3, 0, 1, 2)[None].astype("float32") / 127.5 - 1.0)
    decoded = vae.decode(vae.encode(video, sample_posterior=False))[0].numpy()
    return ((decoded.clip(-1, 1) + 1) * 127.5).transpose(1, 2, 3, 0)


def palette_frames():
    """A square of every palette colour on every background (with the square's own pixels), and frames
    filled with each palette and background colour."""
    objects, masks = [], []
    for rgb in synthetic.COLOURS.values():
        for background in synthetic.BACKGROUNDS.values():
            frame = np.empty((64, 64, 3), np.uint8)
            frame[:] = background
            frame[20:38, 24:42] = rgb
            objects.append(frame)
            mask = np.zeros((64, 64), bool)
            mask[20:38, 24:42] = True
            masks.append(mask)
    solids = [np.full((64, 64, 3), rgb, np.uint8) for rgb in (*synthetic.COLOURS.values(), *synthetic.BACKGROUNDS.values())]
    return np.stack(objects), np.stack(masks), np.stack(solids)


@OLD_VAE_SHIFTS_COLOURS
def test_shipped_vae_keeps_the_palette_colours():
    vae = VideoAutoencoderKL.from_pretrained(os.path.join(SHIPPED, "vae"))
    objects, masks, solids = palette_frames()
    decoded = round_trip(vae, objects)
    object_errors = [np.linalg.norm(d[m].mean(0) - o[m].mean(0)) for d, m, o in zip(decoded, masks, objects)]
    decoded = round_trip(vae, solids)
    solid_errors = [np.linalg.norm(d.reshape(-1, 3).mean(0) - s[0, 0]) for d, s in zip(decoded, solids)]
    assert max(object_errors) < 20 and max(solid_errors) < 10, (np.round(object_errors), np.round(solid_errors))


@OLD_VAE_SHIFTS_COLOURS
@pytest.mark.slow
def test_default_prompt_draws_a_red_circle_moving_right(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/inference.py", "--prompt", "a red circle moving right on a dark background",
         "--save-dir", str(tmp_path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with av.open(result.stdout.strip()) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]).astype(int)
    # Red: a strong red channel well above the other two (orange has green at about 60% of red).
    red = (frames[..., 0] > 150) & (frames[..., 0] - frames[..., 1:].max(axis=-1) > 110)
    shown = [t for t in range(len(frames)) if red[t].sum() >= 20]
    assert len(shown) >= len(frames) // 2, f"a red object in only {len(shown)} frames"
    xs = [np.nonzero(red[t])[1].mean() for t in shown]
    ys = [np.nonzero(red[t])[0].mean() for t in shown]
    dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
    assert dx > 10 and abs(dy) < dx / 2, (dx, dy)


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
        [sys.executable, "toy_world/evaluate.py", "--num-prompts", "2", "--seeds", "3", "4", "--output", str(output)],
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
