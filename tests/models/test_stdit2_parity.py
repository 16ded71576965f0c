"""Our STDiT2 against the original PyTorch Open-Sora v1.1 STDiT2 (fixture from tests/fixtures/make_stdit2_parity.py)."""

import os

import numpy as np
import paddle
import paddle.nn as nn

from models.stdit.stdit2 import STDiT2, STDiT2Config

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "stdit2_parity.npz")
CONFIG = dict(
    input_sq_size=32, in_channels=4, patch_size=(1, 2, 2), hidden_size=48, depth=2, num_heads=2,
    mlp_ratio=2.0, class_dropout_prob=0.1, pred_sigma=True, caption_channels=32, model_max_length=12,
    qk_norm=True,
)
GRADIENT_WEIGHT_SCALE = 0.25


def load_original_weights(model, fixture):
    """PyTorch stores Linear weights as [out, in], Paddle as [in, out]; everything else is copied as is."""
    linear_weights = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}
    torch_state = {key[len("weight/"):]: fixture[key] for key in fixture.files if key.startswith("weight/")}
    assert set(torch_state) == set(model.state_dict())
    model.set_state_dict(
        {name: paddle.to_tensor(value.T if name in linear_weights else value) for name, value in torch_state.items()}
    )


def test_outputs_match_original_pytorch_stdit2():
    fixture = np.load(FIXTURE)
    model = STDiT2(STDiT2Config(**CONFIG))
    load_original_weights(model, fixture)
    model.eval()
    size_args = {key[len("size/"):]: paddle.to_tensor(fixture[key]) for key in fixture.files if key.startswith("size/")}
    x, timestep, y, mask = (paddle.to_tensor(fixture[k]) for k in ("x", "timestep", "y", "mask"))
    out = model(x, timestep, y, mask=mask, **size_args).numpy()
    np.testing.assert_allclose(out, fixture["out"], rtol=1e-4, atol=1e-4 * np.abs(fixture["out"]).max())
    out = model(x, timestep, y, mask=mask, x_mask=paddle.to_tensor(fixture["x_mask"]), **size_args).numpy()
    np.testing.assert_allclose(out, fixture["out_x_mask"], rtol=1e-4, atol=1e-4 * np.abs(fixture["out_x_mask"]).max())


def test_gradients_match_original_pytorch_stdit2():
    """Parameter gradients of the fixture's loss, sum(out * cotangent) + sum(out_x_mask * cotangent_x_mask), with
    the weights scaled by GRADIENT_WEIGHT_SCALE as in make_stdit2_parity.py.

    On the CPU this runs the hand-written backward passes of models/layers/blocks.py (bias sums, expands,
    RMS norm), which must agree with PyTorch's autograd of the original."""
    fixture = np.load(FIXTURE)
    model = STDiT2(STDiT2Config(**CONFIG))
    load_original_weights(model, fixture)
    model.eval()
    with paddle.no_grad():
        for name, param in model.named_parameters():
            if name != "rope.freqs":
                param.set_value(param * GRADIENT_WEIGHT_SCALE)
    size_args = {key[len("size/"):]: paddle.to_tensor(fixture[key]) for key in fixture.files if key.startswith("size/")}
    x, timestep, y, mask, x_mask = (paddle.to_tensor(fixture[k]) for k in ("x", "timestep", "y", "mask", "x_mask"))
    out = model(x, timestep, y, mask=mask, **size_args)
    out_x_mask = model(x, timestep, y, mask=mask, x_mask=x_mask, **size_args)
    loss = (out * paddle.to_tensor(fixture["cotangent"])).sum() + (out_x_mask * paddle.to_tensor(fixture["cotangent_x_mask"])).sum()
    loss.backward()

    linear_weights = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, nn.Linear)}
    expected = {key[len("grad/"):]: fixture[key] for key in fixture.files if key.startswith("grad/")}
    trained = {name: param for name, param in model.named_parameters() if not param.stop_gradient}
    assert set(expected) == set(trained)
    for name, param in trained.items():
        grad = param.grad.numpy()
        reference = expected[name].T if name in linear_weights else expected[name]
        np.testing.assert_allclose(grad, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max(), err_msg=name)
