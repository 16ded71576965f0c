import json
import math

import numpy as np
import paddle
import pytest

from models.layers.blocks import (
    CaptionEmbedder,
    PatchEmbed3D,
    PositionEmbedding2D,
    RotaryEmbedding,
    apply_rotary,
    timestep_embedding,
)
from models.stdit.stdit2 import STDiT2, STDiT2Config, count_parameters
from utils.errors import UserError

TINY = dict(
    input_sq_size=32, hidden_size=48, depth=2, num_heads=2, mlp_ratio=2.0, caption_channels=32,
    model_max_length=12, qk_norm=True, pred_sigma=True,
)


def tiny_model(seed=0, **overrides):
    paddle.seed(seed)
    model = STDiT2(STDiT2Config(**{**TINY, **overrides}))
    randomize(model, seed)
    model.eval()
    return model


def randomize(model, seed):
    """Replace the zero initialisation of output layers so every branch contributes to the output."""
    rng = np.random.default_rng(seed)
    for param in model.parameters():
        if param.stop_gradient:  # rope.freqs: fixed frequencies
            continue
        param.set_value((rng.standard_normal(param.shape) * 0.2).astype("float32"))


def conditioning(batch, num_frames, height, width, fps=24.0):
    full = lambda value: paddle.full([batch], value, dtype="float32")  # noqa: E731
    return dict(num_frames=full(num_frames), height=full(height), width=full(width), ar=full(height / width), fps=full(fps))


def inputs(batch=2, frames=3, h=6, w=8, text_len=12, seed=1):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal([batch, 4, frames, h, w]).astype("float32"))
    t = paddle.to_tensor(rng.uniform(0, 999, [batch]).astype("float32"))
    y = paddle.to_tensor(rng.standard_normal([batch, 1, text_len, 32]).astype("float32"))
    return x, t, y


def test_xl2_preset_parameter_count():
    config = STDiT2Config.from_json_file("configs/stdit2/xl2.json")
    assert count_parameters(config) == 767_452_100


def test_state_dict_names_match_original_layout():
    model = tiny_model()
    state = model.state_dict()
    for name in [
        "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_block.1.weight", "t_block_temp.1.weight",
        "y_embedder.y_embedding", "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.bias", "rope.freqs",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight",
        "blocks.0.attn.proj.bias", "blocks.0.scale_shift_table", "blocks.0.cross_attn.q_linear.weight",
        "blocks.0.cross_attn.kv_linear.weight", "blocks.0.cross_attn.proj.weight", "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight", "blocks.1.attn_temp.qkv.bias", "blocks.1.scale_shift_table_temporal",
        "final_layer.linear.weight", "final_layer.scale_shift_table", "csize_embedder.mlp.0.weight",
        "ar_embedder.mlp.2.bias", "fl_embedder.mlp.0.weight", "fps_embedder.mlp.2.weight",
    ]:
        assert name in state, name
    assert list(state["blocks.0.scale_shift_table"].shape) == [6, 48]
    assert list(state["rope.freqs"].shape) == [12]
    assert list(state["x_embedder.proj.weight"].shape) == [48, 4, 1, 2, 2]
    assert list(state["y_embedder.y_embedding"].shape) == [12, 32]


@pytest.mark.parametrize("frames,h,w", [(3, 6, 8), (1, 5, 7), (4, 9, 11)])
def test_output_shape_including_padded_sizes(frames, h, w):
    model = tiny_model()
    x, t, y = inputs(frames=frames, h=h, w=w)
    out = model(x, t, y, **conditioning(2, frames, h * 8, w * 8))
    assert out.shape == [2, 8, frames, h, w]
    assert out.dtype == paddle.float32
    assert np.isfinite(out.numpy()).all()


def test_pred_sigma_off_gives_input_channels():
    model = tiny_model(pred_sigma=False)
    x, t, y = inputs()
    assert model(x, t, y, **conditioning(2, 3, 48, 64)).shape == [2, 4, 3, 6, 8]


def test_x_mask_all_true_equals_no_mask_and_false_frames_differ():
    model = tiny_model()
    x, t, y = inputs()
    cond = conditioning(2, 3, 48, 64)
    plain = model(x, t, y, **cond).numpy()
    all_generated = model(x, t, y, x_mask=paddle.ones([2, 3], dtype="bool"), **cond).numpy()
    np.testing.assert_allclose(all_generated, plain, rtol=1e-5, atol=1e-5)
    first_given = paddle.to_tensor([[False, True, True], [True, True, True]])
    masked = model(x, t, y, x_mask=first_given, **cond).numpy()
    assert not np.allclose(masked[0], plain[0], atol=1e-4)


def test_conditioning_frames_use_timestep_zero_modulation():
    """A conditioning frame at timestep t is modulated like every frame at timestep 0 (blocks only)."""
    model = tiny_model()
    x, t, y = inputs(batch=1)
    cond = conditioning(1, 3, 48, 64)
    # With every frame conditioning, the blocks see timestep 0 everywhere; only the final layer differs
    # (its generated branch uses the bare timestep embedding), so compare hidden states before it.
    captured = []
    hook = model.final_layer.register_forward_pre_hook(lambda layer, args: captured.append(args[0]))
    model(x, t, y, x_mask=paddle.zeros([1, 3], dtype="bool"), **cond)
    model(x, paddle.zeros([1]), y, **cond)
    hook.remove()
    np.testing.assert_allclose(captured[0].numpy(), captured[1].numpy(), rtol=1e-4, atol=1e-5)


def test_text_mask_ignores_padding_and_matches_unpadded_caption():
    model = tiny_model()
    x, t, y = inputs(batch=1)
    cond = conditioning(1, 3, 48, 64)
    valid = 5
    mask = paddle.to_tensor([[1] * valid + [0] * 7])
    garbage = paddle.concat([y[:, :, :valid], paddle.randn([1, 1, 7, 32]) * 10], axis=2)
    padded = model(x, t, garbage, mask=mask, **cond).numpy()
    unpadded = model(x, t, y[:, :, :valid], **cond).numpy()
    np.testing.assert_allclose(padded, unpadded, rtol=1e-4, atol=1e-5)


def test_per_sample_text_lengths_in_one_batch_match_single_runs():
    model = tiny_model()
    x, t, y = inputs(batch=2)
    cond2 = conditioning(2, 3, 48, 64)
    cond1 = conditioning(1, 3, 48, 64)
    mask = paddle.to_tensor([[1] * 3 + [0] * 9, [1] * 10 + [0] * 2])
    batched = model(x, t, y, mask=mask, **cond2).numpy()
    for i in range(2):
        single = model(x[i : i + 1], t[i : i + 1], y[i : i + 1], mask=mask[i : i + 1], **cond1).numpy()
        np.testing.assert_allclose(batched[i : i + 1], single, rtol=1e-4, atol=1e-5)


def test_mask_is_repeated_for_classifier_free_guidance_batches():
    model = tiny_model()
    x, t, y = inputs(batch=2)
    cond = conditioning(2, 3, 48, 64)
    mask = paddle.to_tensor([[1] * 4 + [0] * 8])
    repeated = model(x, t, y, mask=mask, **cond).numpy()
    explicit = model(x, t, y, mask=mask.tile([2, 1]), **cond).numpy()
    np.testing.assert_allclose(repeated, explicit, rtol=1e-6)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model()
    x, t, y = inputs()
    cond = conditioning(2, 3, 48, 64)
    expected = model(x, t, y, **cond).numpy()
    model.save_pretrained(str(tmp_path / "stdit2"))
    assert json.loads((tmp_path / "stdit2" / "config.json").read_text())["hidden_size"] == 48
    loaded = STDiT2.from_pretrained(str(tmp_path / "stdit2"))
    loaded.eval()
    np.testing.assert_array_equal(loaded(x, t, y, **cond).numpy(), expected)


def test_loading_mismatched_weights_names_the_keys(tmp_path):
    tiny_model().save_pretrained(str(tmp_path / "a"))
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["depth"] = 3
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"missing \(blocks\.2\."):
        STDiT2.from_pretrained(str(tmp_path / "a"))
    with pytest.raises(UserError, match="model directory not found"):
        STDiT2.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    (tmp_path / "b" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="unknown STDiT2 config keys"):
        STDiT2.from_pretrained(str(tmp_path / "b"))


def test_gradient_reaches_every_trainable_parameter_and_checkpointing_matches():
    grads = {}
    for checkpointing in (False, True):
        model = tiny_model(gradient_checkpointing=checkpointing)
        model.train()
        model.y_embedder.uncond_prob = 0.0
        x, t, y = inputs()
        out = model(x, t, y, x_mask=paddle.to_tensor([[False, True, True]] * 2), **conditioning(2, 3, 48, 64))
        (out**2).mean().backward()
        grads[checkpointing] = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if not p.stop_gradient}
        assert model.rope.freqs.grad is None
    for name, grad in grads[False].items():
        assert np.abs(grad).max() > 0, f"no gradient reaches {name}"
        np.testing.assert_allclose(grads[True][name], grad, rtol=1e-4, atol=1e-6)


def test_freeze_options():
    model = STDiT2(STDiT2Config(**TINY, freeze="not_temporal"))
    trainable = [n for n, p in model.named_parameters() if not p.stop_gradient]
    assert trainable and all("attn_temp" in n for n in trainable)
    model = STDiT2(STDiT2Config(**TINY, freeze="text"))
    assert all(p.stop_gradient for n, p in model.named_parameters() if "cross_attn" in n)
    assert not model.blocks[0].attn.qkv.weight.stop_gradient
    with pytest.raises(UserError, match="freeze"):
        STDiT2Config(**TINY, freeze="everything")


def test_initialisation_zeroes_output_projections():
    paddle.seed(0)
    model = STDiT2(STDiT2Config(**TINY))
    for block in model.blocks:
        assert not block.cross_attn.proj.weight.numpy().any()
        assert not block.attn_temp.proj.weight.numpy().any()
        assert block.attn.proj.weight.numpy().any()
    assert not model.final_layer.linear.weight.numpy().any()
    # xavier-uniform bound for the qkv projection
    w = model.blocks[0].attn.qkv.weight.numpy()
    assert np.abs(w).max() <= math.sqrt(6 / (48 + 144)) + 1e-6


# ---------------------------------------------------------------------- building blocks vs numpy


def numpy_2d_sincos(dim, h, w, scale, base_size):
    """MAE-style 2-D embedding: first half encodes the column (w) coordinate, second half the row."""
    grid_h = np.arange(h, dtype=np.float64) / scale * base_size / h
    grid_w = np.arange(w, dtype=np.float64) / scale * base_size / w
    cols, rows = np.meshgrid(grid_w, grid_h)

    def one_axis(positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        out = positions.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1)


def test_position_embedding_matches_numpy_and_is_cached():
    embed = PositionEmbedding2D(48)
    scale = paddle.to_tensor(1.7)
    ours = embed(3, 5, scale, base_size=4).numpy()[0]
    np.testing.assert_allclose(ours, numpy_2d_sincos(48, 3, 5, 1.7, 4), atol=1e-5)
    embed(3, 5, paddle.to_tensor(2.0), base_size=4)
    assert embed._unscaled_angles.cache_info().hits >= 1


def test_rotary_matches_complex_rotation():
    rope = RotaryEmbedding(8)
    x = np.random.default_rng(0).standard_normal([2, 5, 3, 8]).astype("float32")  # [B, L, H, D]
    ours = apply_rotary(paddle.to_tensor(x), *rope.cos_sin(5, "float32")).numpy()
    freqs = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    angles = np.arange(5)[:, None] * freqs[None]  # [L, D/2]
    pairs = x[..., 0::2] + 1j * x[..., 1::2]
    rotated = pairs * np.exp(1j * angles)[None, :, None, :]
    expected = np.stack([rotated.real, rotated.imag], axis=-1).reshape(x.shape)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_timestep_embedding_matches_numpy():
    t = np.array([0.0, 3.5, 999.0])
    ours = timestep_embedding(paddle.to_tensor(t.astype("float32")), 8).numpy()
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    args = t[:, None] * freqs[None]
    np.testing.assert_allclose(ours, np.concatenate([np.cos(args), np.sin(args)], axis=1), atol=1e-4)


def test_patch_embed_pads_to_patch_multiple():
    paddle.seed(0)
    embed = PatchEmbed3D((2, 2, 2), in_chans=1, embed_dim=4)
    x = paddle.randn([1, 1, 3, 5, 5])
    tokens = embed(x)
    assert tokens.shape == [1, 2 * 3 * 3, 4]
    padded = paddle.zeros([1, 1, 4, 6, 6])
    padded[:, :, :3, :5, :5] = x
    np.testing.assert_allclose(tokens.numpy(), embed(padded).numpy(), atol=1e-6)


def test_caption_drop_probability_is_the_configured_one():
    paddle.seed(0)
    embedder = CaptionEmbedder(in_channels=4, hidden_size=6, uncond_prob=0.3, token_num=2)
    caption = paddle.ones([4000, 1, 2, 4]) * 5.0
    dropped = embedder.token_drop(caption)
    fraction = float((dropped[:, 0, 0, 0] != 5.0).astype("float32").mean())
    assert abs(fraction - 0.3) < 0.03
    forced = embedder.token_drop(caption[:2], force_drop_ids=paddle.to_tensor([1, 0]))
    np.testing.assert_allclose(forced[0, 0].numpy(), embedder.y_embedding.numpy())
    np.testing.assert_allclose(forced[1].numpy(), caption[1].numpy())


def test_precomputed_caption_context_gives_the_same_output():
    model = tiny_model()
    x, t, y = inputs()
    cond = conditioning(2, 3, 48, 64)
    mask = paddle.to_tensor([[1] * 4 + [0] * 8])
    context = model.encode_caption(y, mask)
    assert len(context.keys_values) == 2 and context.keys_values[0][0].shape == [2, 12, 2, 24]
    np.testing.assert_allclose(
        model(x, t, context, x_mask=paddle.to_tensor([[False, True, True]] * 2), **cond).numpy(),
        model(x, t, y, mask=mask, x_mask=paddle.to_tensor([[False, True, True]] * 2), **cond).numpy(),
        rtol=1e-6,
    )
