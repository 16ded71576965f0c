"""STDiT3 on a tiny config: layout, conditioning, caption caching, saving, freezing, and a sampler driving it."""

import json

import numpy as np
import paddle
import pytest

from models.stdit.stdit3 import STDiT3, STDiT3Config, count_parameters
from schedulers.rflow import RFLOW
from utils.errors import UserError

TINY = "configs/stdit3/tiny.json"


def tiny_model(seed=0, **overrides):
    paddle.seed(seed)
    model = STDiT3(STDiT3Config(**{**STDiT3Config.from_json_file(TINY).to_dict(), **overrides}))
    # Replace the zero initialisation of output layers so every branch contributes to the output.
    rng = np.random.default_rng(seed)
    for name, param in model.named_parameters():
        if name != "rope.freqs":  # fixed frequencies
            param.set_value((rng.standard_normal(param.shape) * 0.2).astype("float32"))
    model.eval()
    return model


def conditioning(batch, height=48.0, width=64.0, fps=24.0):
    full = lambda value: paddle.full([batch], value, dtype="float32")  # noqa: E731
    return dict(height=full(height), width=full(width), fps=full(fps))


def inputs(batch=2, frames=3, h=6, w=8, text_len=12, seed=1):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal([batch, 4, frames, h, w]).astype("float32"))
    t = paddle.to_tensor(rng.uniform(0, 999, [batch]).astype("float32"))
    y = paddle.to_tensor(rng.standard_normal([batch, 1, text_len, 32]).astype("float32"))
    return x, t, y


def test_xl2_preset_parameter_count():
    # The same count as the original PyTorch STDiT3-XL/2 (parameters, rope.freqs included; not the
    # y_embedding buffer).
    assert count_parameters(STDiT3Config.from_json_file("configs/stdit3/xl2.json")) == 1_207_643_972


def test_state_dict_layout_of_the_original():
    state = tiny_model().state_dict()
    shapes = {
        "rope.freqs": [12], "x_embedder.proj.weight": [48, 4, 1, 2, 2], "fps_embedder.mlp.0.weight": [256, 48],
        "t_block.1.weight": [48, 288], "y_embedder.y_embedding": [12, 32],
        "spatial_blocks.1.scale_shift_table": [6, 48],
        "temporal_blocks.1.attn.q_norm.weight": [24], "temporal_blocks.0.cross_attn.kv_linear.weight": [48, 96],
        "temporal_blocks.0.mlp.fc2.bias": [48], "final_layer.scale_shift_table": [2, 48],
        "final_layer.linear.weight": [48, 32],
    }
    assert {name: list(state[name].shape) for name in shapes} == shapes
    stdit2_only = ("blocks.", "csize_embedder.", "ar_embedder.", "fl_embedder.", "t_block_temp.")
    assert not any(name.startswith(stdit2_only) for name in state)


@pytest.mark.parametrize("frames,h,w", [(1, 5, 7), (4, 6, 8)])
def test_output_shape_including_padded_sizes(frames, h, w):
    x, t, y = inputs(frames=frames, h=h, w=w)
    out = tiny_model()(x, t, y, **conditioning(2))
    assert out.shape == [2, 8, frames, h, w] and out.dtype == paddle.float32
    assert np.isfinite(out.numpy()).all()


def test_stdit2_size_arguments_are_accepted_and_do_not_matter():
    model = tiny_model()
    x, t, y = inputs()
    plain = model(x, t, y, **conditioning(2)).numpy()
    with_stdit2_args = model(x, t, y, num_frames=paddle.full([2], 3.0), ar=paddle.full([2], 0.75), **conditioning(2))
    np.testing.assert_array_equal(with_stdit2_args.numpy(), plain)
    assert not np.allclose(model(x, t, y, **conditioning(2, fps=8.0)).numpy(), plain, atol=1e-3)


def test_x_mask_all_true_equals_no_mask_and_conditioning_frames_see_timestep_zero():
    model = tiny_model()
    x, t, y = inputs(batch=1)
    cond = conditioning(1)
    plain = model(x, t, y, **cond).numpy()
    all_generated = model(x, t, y, x_mask=paddle.ones([1, 3], dtype="bool"), **cond).numpy()
    np.testing.assert_allclose(all_generated, plain, rtol=1e-5, atol=1e-5)
    # With every frame conditioning, the blocks see timestep 0 everywhere (the final layer's generated
    # branch differs, so compare the hidden states before it).
    captured = []
    hook = model.final_layer.register_forward_pre_hook(lambda layer, args: captured.append(args[0]))
    model(x, t, y, x_mask=paddle.zeros([1, 3], dtype="bool"), **cond)
    model(x, paddle.zeros([1]), y, **cond)
    hook.remove()
    np.testing.assert_allclose(captured[0].numpy(), captured[1].numpy(), rtol=1e-4, atol=1e-5)


def test_text_mask_ignores_padding_and_caption_context_gives_the_same_output():
    model = tiny_model()
    x, t, y = inputs()
    cond = conditioning(2)
    mask = paddle.to_tensor([[1] * 5 + [0] * 7])  # one mask for both samples: repeated
    garbage = paddle.concat([y[:, :, :5], paddle.randn([2, 1, 7, 32]) * 10], axis=2)
    padded = model(x, t, garbage, mask=mask, **cond).numpy()
    np.testing.assert_allclose(padded, model(x, t, y[:, :, :5], **cond).numpy(), rtol=1e-4, atol=1e-5)

    x_mask = paddle.to_tensor([[False, True, True]] * 2)
    context = model.encode_caption(garbage, mask)
    assert len(context.keys_values) == 4  # spatial 0, temporal 0, spatial 1, temporal 1
    np.testing.assert_allclose(
        model(x, t, context, x_mask=x_mask, **cond).numpy(),
        model(x, t, garbage, mask=mask, x_mask=x_mask, **cond).numpy(),
        rtol=1e-6,
    )


def test_skip_y_embedder_takes_projected_captions():
    model = tiny_model()
    skipping = tiny_model(skip_y_embedder=True)
    skipping.set_state_dict(model.state_dict())
    x, t, y = inputs()
    projected = model.y_embedder(y, train=False)
    np.testing.assert_allclose(
        skipping(x, t, projected, **conditioning(2)).numpy(), model(x, t, y, **conditioning(2)).numpy(), rtol=1e-5
    )


def test_rflow_sampler_drives_it_with_null_captions_from_y_embedding():
    model = tiny_model()

    class TextEncoder:
        def encode(self, prompts):
            y = paddle.stack([paddle.full([1, 12, 32], 0.1 * len(p)) for p in prompts])
            return {"y": y, "mask": paddle.to_tensor([[1] * 6 + [0] * 6] * len(prompts))}

        def null(self, n):
            return model.y_embedder.y_embedding[None].tile([n, 1, 1])[:, None]

    paddle.seed(0)
    z = paddle.randn([1, 4, 3, 6, 8])
    size_args = {**conditioning(1), "num_frames": paddle.full([1], 3.0), "ar": paddle.full([1], 0.75)}
    first_given = paddle.to_tensor([[0.0, 1.0, 1.0]])
    out = RFLOW(num_sampling_steps=2, use_timestep_transform=True).sample(
        model, TextEncoder(), z, ["a prompt"], size_args, mask=first_given, progress=False
    )
    assert out.shape == z.shape and np.isfinite(out.numpy()).all()
    np.testing.assert_array_equal(out[:, :, 0].numpy(), z[:, :, 0].numpy())  # the given frame is kept


def test_save_load_round_trip_and_bad_directories(tmp_path):
    model = tiny_model()
    x, t, y = inputs()
    expected = model(x, t, y, **conditioning(2)).numpy()
    model.save_pretrained(str(tmp_path / "stdit3"))
    assert json.loads((tmp_path / "stdit3" / "config.json").read_text())["skip_y_embedder"] is False
    loaded = STDiT3.from_pretrained(str(tmp_path / "stdit3"))
    loaded.eval()
    np.testing.assert_array_equal(loaded(x, t, y, **conditioning(2)).numpy(), expected)

    config = json.loads((tmp_path / "stdit3" / "config.json").read_text())
    (tmp_path / "stdit3" / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(UserError, match=r"missing \(spatial_blocks\.2\."):
        STDiT3.from_pretrained(str(tmp_path / "stdit3"))
    (tmp_path / "stdit3" / "config.json").write_text(json.dumps({**config, "ar_embedder": True}))
    with pytest.raises(UserError, match=r"unknown STDiT3 config keys \['ar_embedder'\].*convert_checkpoint.py stdit3"):
        STDiT3.from_pretrained(str(tmp_path / "stdit3"))
    with pytest.raises(UserError, match="STDiT3 model directory not found"):
        STDiT3.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="even head dimension"):
        STDiT3Config(hidden_size=36, num_heads=4)


def test_gradients_reach_every_trainable_parameter_and_checkpointing_matches():
    grads = {}
    for checkpointing in (False, True):
        model = tiny_model(gradient_checkpointing=checkpointing, class_dropout_prob=0.0)
        model.train()
        x, t, y = inputs()
        out = model(x, t, y, x_mask=paddle.to_tensor([[False, True, True]] * 2), **conditioning(2))
        (out**2).mean().backward()
        grads[checkpointing] = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if not p.stop_gradient}
        assert model.rope.freqs.grad is None
    for name, grad in grads[False].items():
        assert np.abs(grad).max() > 0, f"no gradient reaches {name}"
        np.testing.assert_allclose(grads[True][name], grad, rtol=1e-4, atol=1e-6)


def test_freezing_and_initialisation():
    model = tiny_model(only_train_temporal=True)
    assert {n for n, p in model.named_parameters() if not p.stop_gradient} == {
        n for n, _ in model.named_parameters() if n.startswith("temporal_blocks.")
    }
    model = tiny_model(freeze_y_embedder=True)
    assert all(p.stop_gradient == n.startswith("y_embedder.") for n, p in model.named_parameters() if n != "rope.freqs")

    paddle.seed(0)
    fresh = STDiT3(STDiT3Config.from_json_file(TINY))
    for block in fresh.temporal_blocks:
        for linear in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
            assert not linear.weight.numpy().any()
    assert fresh.spatial_blocks[0].attn.proj.weight.numpy().any() and fresh.final_layer.linear.weight.numpy().any()
    assert not fresh.fps_embedder.mlp[2].weight.numpy().any()
