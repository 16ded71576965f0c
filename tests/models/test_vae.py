import json

import numpy as np
import paddle
import pytest

from models.vae.vae import VideoAutoencoderKL, resolve_dtype
from utils.errors import UserError


@pytest.fixture(scope="module")
def vae(tiny_models):
    return VideoAutoencoderKL.from_pretrained(tiny_models["vae"], micro_batch_size=3)


def test_shapes_scaling_and_latent_size(vae):
    x = paddle.rand([2, 3, 5, 64, 64]) * 2 - 1
    z = vae.encode(x)
    assert z.shape == [2, 4, 5, 8, 8]
    assert vae.patch_size == (1, 8, 8) and vae.out_channels == 4 and vae.temporal_compression == 1
    assert vae.get_latent_size((16, 224, 300)) == [16, 28, 37]
    assert vae.decode(z).shape == [2, 3, 5, 64, 64]


def test_micro_batches_equal_one_full_batch(tiny_models, vae):
    whole = VideoAutoencoderKL.from_pretrained(tiny_models["vae"], micro_batch_size=None)
    x = paddle.rand([2, 3, 5, 64, 64]) * 2 - 1
    np.testing.assert_allclose(vae.encode(x, sample_posterior=False).numpy(), whole.encode(x, sample_posterior=False).numpy(), rtol=1e-5, atol=1e-6)
    z = paddle.randn([2, 4, 5, 8, 8])
    np.testing.assert_allclose(vae.decode(z).numpy(), whole.decode(z).numpy(), rtol=1e-5, atol=1e-6)


def test_frames_are_independent_and_ordered(vae):
    x = paddle.rand([1, 3, 4, 64, 64]) * 2 - 1
    z = vae.encode(x, sample_posterior=False)
    single = vae.encode(x[:, :, 2:3], sample_posterior=False)
    np.testing.assert_allclose(z[:, :, 2:3].numpy(), single.numpy(), rtol=1e-5, atol=1e-6)


def test_scaling_factor_comes_from_the_config(tiny_models, vae):
    config = json.load(open(f"{tiny_models['vae']}/config.json"))
    assert vae.scaling_factor == pytest.approx(config["scaling_factor"])
    mean, std = vae.posterior(paddle.rand([1, 3, 2, 64, 64]))
    direct = vae.encode(paddle.rand([1, 3, 2, 64, 64]), sample_posterior=False)
    assert mean.shape == std.shape == direct.shape


def test_dtype_plumbing(tiny_models):
    assert resolve_dtype("float16") == paddle.float16 and resolve_dtype("bfloat16") == paddle.bfloat16
    vae = VideoAutoencoderKL.from_pretrained(tiny_models["vae"], dtype="float32")
    assert all(p.dtype == paddle.float32 for p in vae.parameters())
    with pytest.raises(UserError, match="dtype"):
        resolve_dtype("fp8")


def test_bad_paths(tmp_path, tiny_models):
    with pytest.raises(UserError, match="not found"):
        VideoAutoencoderKL.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="hub downloads are not available"):
        VideoAutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")
    with pytest.raises(UserError, match="not a VAE"):
        VideoAutoencoderKL.from_pretrained(tiny_models["text_encoder"])
