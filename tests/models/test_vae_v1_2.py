"""The Open-Sora v1.2 VAE's frame bookkeeping, files and errors, on the tiny config (random weights)."""

import json
import os

import numpy as np
import paddle
import pytest

from models.vae.vae_v1_2 import VideoAutoencoderV1_2, VideoAutoencoderV1_2Config
from utils.errors import UserError

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "vae_v1_2", "tiny.json")


def tiny_config(**changes):
    with open(TINY_CONFIG, encoding="utf-8") as f:
        values = json.load(f)
    values.update(changes)
    return VideoAutoencoderV1_2Config(**values)


@pytest.fixture(scope="module")
def vae():
    paddle.seed(0)
    return VideoAutoencoderV1_2(tiny_config(), micro_batch_size=4)


def video(frames, batch=1):
    return paddle.rand([batch, 3, frames, 8, 8]) * 2 - 1


def test_interface_shared_with_the_per_frame_vae(vae):
    assert vae.out_channels == 4 and vae.temporal_compression == 4 and vae.patch_size == (4, 2, 2)
    assert vae.get_latent_size((51, 240, 426)) == [15, 120, 213]
    assert vae.get_latent_size((None, 16, 16)) == [None, 8, 8]
    z = vae.encode(video(20, batch=2))
    assert z.shape == [2, 4, 6, 4, 4]
    assert vae.decode(z, num_frames=20).shape == [2, 3, 20, 8, 8]


def test_chunks_of_17_frames_are_encoded_independently(vae):
    x = video(34)
    z = vae.encode(x, sample_posterior=False)
    second_chunk = vae.encode(x[:, :, 17:], sample_posterior=False)
    np.testing.assert_allclose(z[:, :, 5:].numpy(), second_chunk.numpy(), rtol=1e-5, atol=1e-6)
    sampled = vae.encode(x)
    assert sampled.shape == z.shape and not np.allclose(sampled.numpy(), z.numpy())


def test_decode_without_num_frames_gives_all_frames_the_latents_hold(vae):
    z = paddle.randn([1, 4, 6, 4, 4])  # a full chunk of 5 latent frames (17 frames) and 1 more (up to 4 frames)
    everything = vae.decode(z)
    assert everything.shape[2] == 21
    np.testing.assert_allclose(everything.numpy(), vae.decode(z, num_frames=21).numpy(), rtol=1e-5, atol=1e-6)
    # fewer frames from the same latents: the front of the last chunk is dropped
    fewer = vae.decode(z, num_frames=18)
    np.testing.assert_allclose(fewer.numpy(), everything[:, :, [*range(17), 20]].numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="num_frames 34 is encoded in 10 latent frames, but the latents have 6"):
        vae.decode(z, num_frames=34)


def test_one_chunk_for_the_whole_clip_without_micro_frame_size():
    vae = VideoAutoencoderV1_2(tiny_config(micro_frame_size=None))
    assert vae.get_latent_size((34, 8, 8))[0] == 9
    z = vae.encode(video(34), sample_posterior=False)
    assert z.shape[2] == 9 and vae.decode(z).shape[2] == 36 and vae.decode(z, num_frames=34).shape[2] == 34


def test_spatial_micro_batches_equal_one_batch(vae):
    whole = VideoAutoencoderV1_2(vae.config, micro_batch_size=None)
    whole.set_state_dict(vae.state_dict())
    x = video(6, batch=2)
    np.testing.assert_allclose(whole.encode(x, sample_posterior=False).numpy(), vae.encode(x, sample_posterior=False).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip(tmp_path, vae):
    vae.save_pretrained(str(tmp_path / "vae"))
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["micro_frame_size"] == 17 and config["spatial_vae"]["scaling_factor"] == pytest.approx(0.18215)
    loaded = VideoAutoencoderV1_2.from_pretrained(str(tmp_path / "vae"), micro_batch_size=2)
    assert loaded.spatial_vae.micro_batch_size == 2
    x = video(18)
    np.testing.assert_allclose(loaded.encode(x, sample_posterior=False).numpy(), vae.encode(x, sample_posterior=False).numpy(),
                               rtol=1e-6, atol=1e-6)
    half = VideoAutoencoderV1_2.from_pretrained(str(tmp_path / "vae"), dtype="bfloat16")
    assert half.dtype == paddle.bfloat16 and all(p.dtype == paddle.bfloat16 for p in half.temporal_vae.parameters())


def test_bad_directories_and_configs(tmp_path, tiny_models, vae):
    with pytest.raises(UserError, match="not a VAE v1.2 config"):
        VideoAutoencoderV1_2.from_pretrained(tiny_models["vae"])  # an Open-Sora v1.1 (per-frame) VAE
    with pytest.raises(UserError, match="hub downloads are not available"):
        VideoAutoencoderV1_2.from_pretrained("hpcai-tech/OpenSora-VAE-v1.2")
    with pytest.raises(UserError, match=r"unknown TemporalVAEConfig keys \['filter'\]"):
        tiny_config(temporal_vae={"filter": 4})
    with pytest.raises(UserError, match="temporal_downsample"):
        tiny_config(temporal_vae={"channel_multipliers": [1, 2]})

    vae.save_pretrained(str(tmp_path / "vae"))
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["temporal_vae"]["filters"] = 8
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="weights do not match config.json"):
        VideoAutoencoderV1_2.from_pretrained(str(tmp_path / "vae"))


def test_posterior_for_pre_encoded_training_is_the_deterministic_encoding_and_its_spread(vae):
    paddle.seed(1)
    x = video(20)
    mean, std = vae.posterior(x)
    np.testing.assert_allclose(mean.numpy(), vae.encode(x, sample_posterior=False).numpy(), rtol=1e-6, atol=1e-6)
    # the spread by hand: the temporal encoder's log-variance of each chunk (17 frames padded to 20, then 3 to 4)
    frame_latents = vae.spatial_vae.encode(x, sample_posterior=False)
    scale = np.asarray(tiny_config().scale, dtype=np.float32).reshape(1, -1, 1, 1, 1)
    for chunk, (start, frames, padding) in enumerate([(0, 17, 3), (17, 3, 1)]):
        padded = paddle.concat([paddle.zeros([1, 4, padding, 4, 4]), frame_latents[:, :, start : start + frames]], axis=2)
        with paddle.no_grad():
            moments = vae.temporal_vae.quant_conv(vae.temporal_vae.encoder(padded)).numpy()
        expected = np.exp(0.5 * np.clip(moments[:, 4:], -30.0, 20.0)) / scale
        latent_start = 5 * chunk
        np.testing.assert_allclose(std.numpy()[:, :, latent_start : latent_start + expected.shape[2]], expected, rtol=1e-5)
    assert vae.scaling_factor == 1.0  # training multiplies the drawn latent by it: already normalised
