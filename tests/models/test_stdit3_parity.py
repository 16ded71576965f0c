"""Our STDiT3 against the original PyTorch Open-Sora v1.2 STDiT3 (fixture from tests/fixtures/make_stdit3_parity.py)."""

import os

import numpy as np
import paddle
import paddle.nn as nn
import pytest

from models.stdit.stdit3 import STDiT3, STDiT3Config

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "stdit3_parity.npz")
TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "stdit3", "tiny.json")


def model_with_original_weights(fixture):
    """PyTorch stores Linear weights as [out, in], Paddle as [in, out]; everything else is copied as is."""
    model = STDiT3(STDiT3Config.from_json_file(TINY_CONFIG))
    linear_weights = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}
    torch_state = {key[len("weight/"):]: fixture[key] for key in fixture.files if key.startswith("weight/")}
    assert set(torch_state) == set(model.state_dict())
    model.set_state_dict(
        {name: paddle.to_tensor(value.T if name in linear_weights else value) for name, value in torch_state.items()}
    )
    model.eval()
    return model


@pytest.fixture(scope="module")
def fixture_and_model():
    fixture = np.load(FIXTURE)
    return fixture, model_with_original_weights(fixture)


@pytest.mark.parametrize(
    "case,uses_text_mask,uses_x_mask",
    [("out", False, False), ("out_text_mask", True, False), ("out_x_mask", True, True)],
)
def test_outputs_match_original_pytorch_stdit3(fixture_and_model, case, uses_text_mask, uses_x_mask):
    fixture, model = fixture_and_model
    inputs = {key: paddle.to_tensor(fixture[key]) for key in ("x", "timestep", "y")}
    size_args = {key[len("size/"):]: paddle.to_tensor(fixture[key]) for key in fixture.files if key.startswith("size/")}
    mask = paddle.to_tensor(fixture["mask"]) if uses_text_mask else None
    x_mask = paddle.to_tensor(fixture["x_mask"]) if uses_x_mask else None
    out = model(inputs["x"], inputs["timestep"], inputs["y"], mask=mask, x_mask=x_mask, **size_args).numpy()
    expected = fixture[case]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
