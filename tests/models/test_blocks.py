import numpy as np
import paddle
import paddle.nn.functional as F

from models.layers import blocks
from models.layers.blocks import attention, expand_as, gated, math_attention, t2i_modulate


def numpy_attention(q, k, v, mask=None):
    """Reference over [B, L, H, D] arrays; mask [B, 1, 1, L_k] bool, True = attend."""
    q, k, v = (a.transpose(0, 2, 1, 3).astype(np.float64) for a in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ v).transpose(0, 2, 1, 3)


def random_qkv(rng, B=2, Lq=7, Lk=5, H=3, D=8):
    return [rng.standard_normal(shape).astype("float32") for shape in ([B, Lq, H, D], [B, Lk, H, D], [B, Lk, H, D])]


def test_math_attention_matches_numpy_with_and_without_mask():
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(rng)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)[:, None, None, :]
    for m in (None, mask):
        ours = math_attention(*map(paddle.to_tensor, (q, k, v)), attn_mask=None if m is None else paddle.to_tensor(m))
        np.testing.assert_allclose(ours.numpy(), numpy_attention(q, k, v, m), rtol=1e-5, atol=1e-6)


def test_padding_tokens_do_not_change_the_output():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, B=1)
    mask = paddle.to_tensor(np.array([1, 1, 0, 0, 0], dtype=bool)[None, None, None, :])
    full = math_attention(*map(paddle.to_tensor, (q, k, v)), attn_mask=mask)
    k[:, 2:], v[:, 2:] = 100.0, -100.0
    changed = math_attention(*map(paddle.to_tensor, (q, k, v)), attn_mask=mask)
    np.testing.assert_allclose(full.numpy(), changed.numpy(), rtol=1e-6)


def test_cpu_uses_math_attention_and_gpu_branch_agrees(monkeypatch):
    assert not blocks.uses_fused_attention(paddle.CPUPlace())
    rng = np.random.default_rng(2)
    q, k, v = map(paddle.to_tensor, random_qkv(rng))
    mask = paddle.to_tensor(np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=bool)[:, None, None, :])
    calls = []
    paddle_sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append(kwargs["attn_mask"])
        return paddle_sdpa(*args, **kwargs)

    # The GPU branch hands the same bool mask (True = attend) to Paddle's sdpa; on the CPU that runs Paddle's
    # own math fallback, so both branches can be compared here.
    monkeypatch.setattr(blocks, "uses_fused_attention", lambda place: True)
    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", recording_sdpa, raising=True)
    fused = attention(q, k, v, attn_mask=mask)
    monkeypatch.undo()
    assert len(calls) == 1 and calls[0].dtype == paddle.bool
    np.testing.assert_allclose(fused.numpy(), attention(q, k, v, attn_mask=mask).numpy(), rtol=1e-5, atol=1e-6)


def test_expanded_elementwise_ops_equal_broadcasting():
    rng = np.random.default_rng(3)
    x = rng.standard_normal([2, 4, 3, 6]).astype("float32")
    shift, scale, gate = (rng.standard_normal([2, 1, 1, 6]).astype("float32") for _ in range(3))
    tx, tshift, tscale, tgate = map(paddle.to_tensor, (x, shift, scale, gate))
    assert expand_as(tgate, tx).shape == [2, 4, 3, 6]
    np.testing.assert_allclose(t2i_modulate(tx, tshift, tscale).numpy(), x * (1 + scale) + shift, rtol=1e-6)
    np.testing.assert_allclose(gated(tgate, tx).numpy(), gate * x, rtol=1e-6)


def test_broadcast_by_matmul_equals_expand_and_its_gradient_is_the_sum():
    rng = np.random.default_rng(4)
    cotangent = rng.standard_normal([2, 4, 3, 6]).astype("float32")
    # one run of broadcast axes (in the middle, in front, missing in front, at the end), nothing to broadcast,
    # and a split run (a plain expand)
    for shape in ([2, 1, 1, 6], [2, 4, 1, 6], [1, 1, 3, 6], [3, 6], [6], [2, 4, 3, 1], [2, 4, 3, 6], [2, 1, 3, 1]):
        value = rng.standard_normal(shape).astype("float32")
        param = paddle.to_tensor(value, stop_gradient=False)
        out = blocks.broadcast_by_matmul(param, [2, 4, 3, 6])
        np.testing.assert_array_equal(out.numpy(), np.broadcast_to(value, [2, 4, 3, 6]))
        (out * paddle.to_tensor(cotangent)).sum().backward()
        axes = tuple(i for i, size in enumerate([1] * (4 - len(shape)) + shape) if size == 1)
        expected = cotangent.sum(axis=axes, keepdims=True).reshape(shape)
        np.testing.assert_allclose(param.grad.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cpu_training_backward_passes_match_autograd_of_the_plain_ops(monkeypatch):
    """expand_as, LayerNorm, Linear and RMSNorm give the gradients Paddle's own autograd gives for the plain ops,
    including a Linear without bias and one with a frozen weight; `paddle.grad` for a subset of the inputs
    works through them."""
    rng = np.random.default_rng(5)
    x_value = rng.standard_normal([2, 4, 3, 8]).astype("float32")
    params = {name: rng.standard_normal(shape).astype("float32") for name, shape in
              (("gate", [2, 1, 1, 8]), ("shift", [2, 4, 1, 8]), ("scale", [2, 1, 1, 8]), ("cotangent", [2, 4, 3, 2, 4]))}
    paddle.seed(0)
    linear, no_bias, frozen = blocks.Linear(8, 8), blocks.Linear(8, 8, bias_attr=False), blocks.Linear(8, 8)
    frozen.weight.stop_gradient = True
    norm = blocks.RMSNorm(4)
    norm.weight.set_value(paddle.to_tensor(rng.standard_normal([4]).astype("float32")))
    layers = [linear, no_bias, frozen, norm]

    def gradients():
        x = paddle.to_tensor(x_value, stop_gradient=False)
        gate, shift, scale = (paddle.to_tensor(params[k], stop_gradient=False) for k in ("gate", "shift", "scale"))
        h = t2i_modulate(blocks.layer_norm_without_affine(8)(gated(gate, x)), shift, scale)
        h = frozen(no_bias(linear(h)))
        out = norm(h.reshape([2, 4, 3, 2, 4]))
        (out * paddle.to_tensor(params["cotangent"])).sum().backward()
        tensors = [x, gate, shift, scale] + [p for layer in layers for p in layer.parameters() if not p.stop_gradient]
        grads = [t.grad.numpy().copy() for t in tensors]
        for layer in layers:
            layer.clear_gradients()
        return grads

    assert blocks.cpu_autograd(paddle.to_tensor(x_value, stop_gradient=False))
    custom = gradients()
    monkeypatch.setattr(blocks, "cpu_autograd", lambda *tensors: False)
    plain = gradients()
    assert len(custom) == len(plain) == 4 + 5  # linear weight and bias, no_bias weight, frozen bias, norm weight
    for ours, reference in zip(custom, plain):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())

    monkeypatch.undo()
    x = paddle.to_tensor(x_value, stop_gradient=False)
    out = norm(linear(gated(paddle.to_tensor(params["gate"], stop_gradient=False), x)).reshape([2, 4, 3, 2, 4]))
    (grad_x,) = paddle.grad([out], [x], [paddle.to_tensor(params["cotangent"])])
    assert grad_x.shape == x.shape
