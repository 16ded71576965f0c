"""Our Open-Sora v1.2 VAE against the original PyTorch one (fixture from tests/fixtures/make_vae_v1_2_parity.py):
deterministic encoding and decoding of two full 17-frame chunks, of a clip whose length is not a multiple of
17, and the latent frame counts of many clip lengths."""

import os

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from models.vae.vae_v1_2 import VideoAutoencoderV1_2, VideoAutoencoderV1_2Config

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "vae_v1_2_parity.npz")
TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "vae_v1_2", "tiny.json")


def model_with_original_weights(fixture):
    """Same names as the original; PyTorch stores Linear weights (the spatial VAE's attention) as [out, in],
    Paddle as [in, out]. The original's `scale` and `shift` buffers are config values here."""
    config = VideoAutoencoderV1_2Config.from_json_file(TINY_CONFIG)
    torch_state = {key[len("weight/"):]: fixture[key] for key in fixture.files if key.startswith("weight/")}
    np.testing.assert_allclose(torch_state.pop("scale").ravel(), config.scale, rtol=1e-6)
    np.testing.assert_allclose(torch_state.pop("shift").ravel(), config.shift, rtol=1e-6)
    model = VideoAutoencoderV1_2(config, micro_batch_size=4)
    linear_weights = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}
    assert linear_weights and set(torch_state) == set(model.state_dict())
    model.set_state_dict(
        {name: paddle.to_tensor(value.T if name in linear_weights else value) for name, value in torch_state.items()}
    )
    return model


@pytest.fixture(scope="module")
def fixture_and_model():
    fixture = np.load(FIXTURE)
    return fixture, model_with_original_weights(fixture)


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("case", ["two_chunks", "partial_chunk"])
def test_encoding_matches_original(fixture_and_model, case):
    fixture, model = fixture_and_model
    z = model.encode(paddle.to_tensor(fixture[f"encode/{case}/x"]), sample_posterior=False).numpy()
    assert_close(z, fixture[f"encode/{case}/z"])


@pytest.mark.parametrize("case", ["two_chunks", "partial_chunk", "one_extra_frame"])
def test_decoding_matches_original(fixture_and_model, case):
    fixture, model = fixture_and_model
    x = model.decode(paddle.to_tensor(fixture[f"decode/{case}/z"]), num_frames=int(fixture[f"decode/{case}/num_frames"])).numpy()
    assert_close(x, fixture[f"decode/{case}/x"])


def test_latent_frame_counts_match_original(fixture_and_model):
    fixture, model = fixture_and_model
    ours = [model.get_latent_size([int(t), 8, 8])[0] for t in fixture["latent_size/frames"]]
    assert ours == fixture["latent_size/latent_frames"].tolist()
