"""Frame conditioning reaches the sampler: through the real command, a conditioned frame of the output video is
the VAE reconstruction of its reference (image to video, connect, extend), and the other frames are not."""

import os
import subprocess
import sys

import av
import numpy as np
import paddle
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_FRAMES = 6
# H.264 keeps luma at full resolution; the tiny VAE's busy output loses more in the subsampled chroma.
SAME_FRAME_DB = 30
OTHER_FRAME_DB = 25


@pytest.fixture(scope="module")
def sharp_vae(tiny_models, tmp_path_factory):
    """The tiny VAE with a posterior of (almost) zero variance.

    The command encodes references with a sampled posterior; a random VAE's variance is about 1, which would
    make the reconstruction a random draw. With the log-variance pinned at -30 the sample is the mean, so the
    test can compute the reconstruction on its own.
    """
    from ppdiffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_models["vae"])
    weight, bias = vae.quant_conv.weight.numpy(), vae.quant_conv.bias.numpy()
    latent_channels = vae.config.latent_channels
    weight[latent_channels:] = 0
    bias[latent_channels:] = -30
    vae.quant_conv.weight.set_value(weight)
    vae.quant_conv.bias.set_value(bias)
    path = str(tmp_path_factory.mktemp("sharp_vae"))
    vae.save_pretrained(path)
    return vae, path


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Two 64x64 images with structure (gradients and a block) and a 6-frame video of the first one shifting."""
    root = tmp_path_factory.mktemp("references")
    rows, columns = np.mgrid[0:64, 0:64]
    first = np.stack([columns * 4, rows * 4, 255 - columns * 2], axis=-1).astype(np.uint8)
    first[16:40, 20:44] = (255, 0, 0)
    second = np.stack([255 - rows * 4, columns * 3, rows * 2], axis=-1).astype(np.uint8)
    Image.fromarray(first).save(root / "first.png")
    Image.fromarray(second).save(root / "second.png")
    with av.open(str(root / "clip.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height = stream.width = 64
        stream.pix_fmt = "yuv420p"
        for shift in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(first, 8 * shift, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return dict(first=(str(root / "first.png"), first), second=(str(root / "second.png"), second),
                clip=(str(root / "clip.mp4"), read_video(str(root / "clip.mp4"))))


def read_video(path):
    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def reconstruction(vae, image):
    """uint8 [H, W, 3] -> the VAE's decoding of its posterior mean, as uint8."""
    x = paddle.to_tensor(image.astype("float32").transpose(2, 0, 1)[None] / 127.5 - 1.0)
    with paddle.no_grad():
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample.numpy()[0]
    return ((decoded.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)


def luma_psnr(a, b):
    weights = np.array([0.299, 0.587, 0.114])
    error = np.mean((a.astype("float64") @ weights - b.astype("float64") @ weights) ** 2)
    return 10 * np.log10(255**2 / max(error, 1e-12))


def test_conditioned_frames_are_the_reconstructions_of_their_references(tiny_models, sharp_vae, references, tmp_path):
    vae, vae_path = sharp_vae
    first, second, clip = references["first"], references["second"], references["clip"]
    prompts = [
        f'a red circle{{"reference_path": "{first[0]}", "mask_strategy": "0"}}',
        f'a red circle{{"reference_path": "{first[0]};{second[0]}", "mask_strategy": "0;0,1,0,-1,1"}}',
        f'a red circle{{"reference_path": "{clip[0]}", "mask_strategy": "0,0,0,-3,3"}}',
    ]
    result = subprocess.run(
        [sys.executable, "scripts/inference-long.py", "--prompt", *prompts, "--num-frames", str(NUM_FRAMES),
         "--image-size", "64", "64", "--model-path", tiny_models["stdit2"], "--vae-path", vae_path,
         "--text-encoder-path", tiny_models["text_encoder"], "--save-dir", str(tmp_path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    image_cond, connect, extend = [read_video(path) for path in result.stdout.split()]
    # output frame -> the reference frame it must reproduce
    expected = [
        (image_cond, {0: first[1]}),
        (connect, {0: first[1], NUM_FRAMES - 1: second[1]}),
        (extend, {3: clip[1][0], 4: clip[1][1], 5: clip[1][2]}),
    ]
    for video, conditioned in expected:
        assert len(video) == NUM_FRAMES
        for index, reference in conditioned.items():
            target = reconstruction(vae, reference)
            assert luma_psnr(video[index], target) > SAME_FRAME_DB, index
            # the comparison tells frames apart: generated frames are far from this reconstruction
            for other in set(range(NUM_FRAMES)) - set(conditioned):
                assert luma_psnr(video[other], target) < OTHER_FRAME_DB, (index, other)
