"""The attention cache of STDiT2 / STDiT3 sampling (models/stdit/attention_cache.py): off it changes nothing;
inside a kind's broadcast range a reused step gives exactly what the model gives with that attention layer's
output replaced by the stored one; outside it everything is computed; runs start afresh; bad configs are
user errors."""

import collections

import numpy as np
import paddle
import pytest

from models.stdit.attention_cache import ATTENTION_CACHE_PRESETS, AttentionCache, AttentionCacheConfig, Broadcast
from models.stdit.stdit2 import STDiT2, STDiT2Config
from models.stdit.stdit3 import STDiT3, STDiT3Config
from schedulers.guidance import guided_prediction
from utils.errors import UserError

TINY_STDIT2 = dict(
    input_sq_size=32, hidden_size=48, depth=2, num_heads=2, mlp_ratio=2.0, caption_channels=32,
    model_max_length=12, qk_norm=True, pred_sigma=False,
)
# Every kind reused at every step after a run's first: the most a cache can diverge from the model.
ALWAYS = Broadcast(timesteps=(-1, 1001), interval=10**6)
REUSE_ALL = AttentionCacheConfig(spatial=ALWAYS, temporal=ALWAYS, cross=ALWAYS)
NEVER_REUSE = AttentionCacheConfig(
    spatial=Broadcast((-1, 1001), 1), temporal=Broadcast((-1, 1001), 1), cross=Broadcast((-1, 1001), 1)
)


def randomized(model, seed=0):
    """Replace the zero initialisation of output layers so every attention contributes to the output."""
    rng = np.random.default_rng(seed)
    for name, param in model.named_parameters():
        if name != "rope.freqs":  # fixed frequencies
            param.set_value((rng.standard_normal(param.shape) * 0.2).astype("float32"))
    model.eval()
    return model


def tiny_stdit2(seed=0):
    paddle.seed(seed)
    return randomized(STDiT2(STDiT2Config(**TINY_STDIT2)), seed)


def tiny_stdit3(seed=0):
    paddle.seed(seed)
    return randomized(STDiT3(STDiT3Config.from_json_file("configs/stdit3/tiny.json")), seed)


def batch(size=2, frames=3, seed=1):
    """Latents, caption features, caption mask and size conditioning of a batch."""
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal([size, 4, frames, 6, 8]).astype("float32"))
    y = paddle.to_tensor(rng.standard_normal([size, 1, 12, 32]).astype("float32"))
    mask = paddle.to_tensor([[1] * 7 + [0] * 5] * size)
    full = lambda value: paddle.full([size], value, dtype="float32")  # noqa: E731
    size_args = dict(num_frames=full(frames), height=full(48.0), width=full(64.0), ar=full(0.75), fps=full(24.0))
    return x, y, mask, size_args


def step(model, x, t, y, mask, size_args, x_mask=None):
    timestep = paddle.full([x.shape[0]], float(t), dtype="float32")
    with paddle.no_grad():
        return model(x, timestep, y, mask, x_mask=x_mask, **size_args).numpy()


def attention_layers(model):
    """{(block index, kind): the layer whose output the cache stores}, blocks in forward order."""
    if isinstance(model, STDiT3):
        blocks = model.blocks_in_order()
        return {
            **{(i, "temporal" if b.temporal else "spatial"): b.attn for i, b in enumerate(blocks)},
            **{(i, "cross"): b.cross_attn for i, b in enumerate(blocks)},
        }
    layers = {}
    for i, block in enumerate(model.blocks):
        layers.update({(i, "spatial"): block.attn, (i, "temporal"): block.attn_temp, (i, "cross"): block.cross_attn})
    return layers


def with_attention_outputs_replaced(model, stored, kinds, run):
    """`run()` on the uncached model with the outputs of the attention layers of `kinds` replaced by `stored`:
    what a cache that reuses those kinds must compute. With `stored` empty, records the outputs instead."""
    handles = []
    for key, layer in attention_layers(model).items():
        if key[1] not in kinds:
            continue

        def hook(layer, inputs, output, key=key):
            if key in stored and stored[key] is not None:
                return stored[key]
            stored[key] = output
            return None

        handles.append(layer.register_forward_post_hook(hook))
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------ off = untouched


@pytest.mark.parametrize("make_model", [tiny_stdit2, tiny_stdit3])
def test_disabled_or_never_reusing_cache_gives_the_uncached_outputs_exactly(make_model):
    model = make_model()
    x, y, mask, size_args = batch()
    timesteps = (1000, 900, 800)
    uncached = [step(model, x + 0.1 * i, t, y, mask, size_args) for i, t in enumerate(timesteps)]

    model.enable_attention_cache("fast")
    model.disable_attention_cache()
    assert model.attention_cache is None
    with model.attention_cache_enabled(None) as cache:
        assert cache is None
        off = [step(model, x + 0.1 * i, t, y, mask, size_args) for i, t in enumerate(timesteps)]
    with model.attention_cache_enabled(NEVER_REUSE) as cache:
        never = [step(model, x + 0.1 * i, t, y, mask, size_args) for i, t in enumerate(timesteps)]
    assert model.attention_cache is None  # the context restores the previous (no) cache
    for expected, a, b in zip(uncached, off, never):
        np.testing.assert_array_equal(a, expected)
        np.testing.assert_array_equal(b, expected)
    assert sum(cache.reused.values()) == 0 and sum(cache.computed.values()) > 0


# ------------------------------------------------------------------------- inside and outside the range


@pytest.mark.parametrize("make_model", [tiny_stdit2, tiny_stdit3])
@pytest.mark.parametrize("kinds", [("spatial",), ("temporal",), ("cross",), ("spatial", "temporal", "cross")])
def test_a_reused_step_equals_the_model_with_the_stored_attention_outputs(make_model, kinds):
    model = make_model()
    x, y, mask, size_args = batch()
    x_next = x * 0.9 + 0.3  # the latents move between steps, so fresh attention would differ
    config = AttentionCacheConfig(**{kind: Broadcast(timesteps=(500, 950), interval=2) for kind in kinds})

    stored = {}
    first = with_attention_outputs_replaced(model, stored, kinds, lambda: step(model, x, 1000, y, mask, size_args))
    expected = with_attention_outputs_replaced(
        model, stored, kinds, lambda: step(model, x_next, 900, y, mask, size_args)
    )
    fresh = step(model, x_next, 900, y, mask, size_args)
    assert np.abs(expected - fresh).max() > 1e-3  # reusing is visible in the output

    with model.attention_cache_enabled(config) as cache:
        np.testing.assert_array_equal(step(model, x, 1000, y, mask, size_args), first)  # outside: computed
        np.testing.assert_allclose(step(model, x_next, 900, y, mask, size_args), expected, rtol=1e-6, atol=1e-6)
    layers_of_kind = collections.Counter(kind for _, kind in attention_layers(model))
    assert dict(cache.reused) == {kind: layers_of_kind[kind] for kind in kinds}  # once in every block that has it


def test_steps_outside_the_range_recompute_everything():
    model = tiny_stdit2()
    x, y, mask, size_args = batch()
    middle = Broadcast(timesteps=(400, 600), interval=2)
    config = AttentionCacheConfig(spatial=middle, temporal=middle, cross=middle)
    # 1000 and 800 above the range, 500 inside (reused), 300 and 100 below
    timesteps = (1000, 800, 500, 300, 100)
    uncached = [step(model, x + 0.1 * i, t, y, mask, size_args) for i, t in enumerate(timesteps)]
    with model.attention_cache_enabled(config) as cache:
        cached = [step(model, x + 0.1 * i, t, y, mask, size_args) for i, t in enumerate(timesteps)]
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(cached[i], uncached[i])
    assert np.abs(cached[2] - uncached[2]).max() > 1e-3
    assert cache.reused == {"spatial": 2, "temporal": 2, "cross": 2}  # one step x two blocks
    assert cache.computed == {"spatial": 8, "temporal": 8, "cross": 8}


def test_each_kind_is_recomputed_once_every_interval_steps_inside_its_range():
    model = tiny_stdit2()  # two blocks
    x, y, mask, size_args = batch()
    # cross's range includes the run's first step, which computes all the same
    config = AttentionCacheConfig(
        spatial=Broadcast((550, 950), 2), temporal=Broadcast((550, 950), 3), cross=Broadcast((550, 1001), 3)
    )
    with model.attention_cache_enabled(config) as cache:
        reused_steps = []
        for t in (1000, 900, 800, 700, 600, 500):
            before = dict(cache.reused)
            step(model, x, t, y, mask, size_args)
            reused_steps.append(sorted(kind for kind in cache.reused if cache.reused[kind] != before.get(kind, 0)))
    # inside the range, spatial is computed at 800 and 600, temporal and cross at 700
    assert reused_steps == [
        [], ["cross", "spatial", "temporal"], ["cross", "temporal"], ["spatial"], ["cross", "temporal"], []
    ]
    assert cache.computed == {"spatial": 8, "temporal": 6, "cross": 6}  # two blocks


def test_without_broadcast_a_kind_is_computed_at_every_step_and_not_stored():
    model = tiny_stdit2()
    x, y, mask, size_args = batch()
    with model.attention_cache_enabled(AttentionCacheConfig(temporal=ALWAYS)) as cache:
        for t in (1000, 900, 800):
            step(model, x, t, y, mask, size_args)
    assert cache.computed == {"spatial": 6, "temporal": 2, "cross": 6} and cache.reused == {"temporal": 4}
    assert sorted(cache.outputs) == [(0, "temporal"), (1, "temporal")]


# ------------------------------------------------------------------------------------ runs start afresh


def sample(model, z, y, mask, size_args, timesteps, x_mask=None, cfg_scale=4.0):
    """Euler steps of a rectified-flow sampler with classifier-free guidance on the doubled batch."""
    text_args = {"y": model.encode_caption(paddle.concat([y, paddle.zeros_like(y)]), mask)}
    doubled = {key: paddle.concat([value, value]) for key, value in size_args.items()}
    timesteps = list(timesteps) + [0.0]
    for t, t_next in zip(timesteps[:-1], timesteps[1:]):
        t_batch = paddle.full([z.shape[0]], t, dtype="float32")
        with paddle.no_grad():
            velocity = guided_prediction(model, z, t_batch, text_args, doubled, x_mask, cfg_scale, z.shape[1])
        velocity = velocity[:, : z.shape[1]]  # without the variance channels of a pred_sigma model
        z = z + velocity * (t - t_next) / 1000
    return z.numpy()


SCHEDULE = (1000, 950, 900, 850, 800, 700, 600)


@pytest.mark.parametrize("make_model", [tiny_stdit2, tiny_stdit3])
def test_every_sampling_run_starts_with_a_full_step(make_model):
    model = make_model()
    x, y, mask, size_args = batch(size=1)
    uncached = sample(model, x, y, mask, size_args, SCHEDULE)
    with model.attention_cache_enabled(REUSE_ALL) as cache:
        first = sample(model, x, y, mask, size_args, SCHEDULE)
        again = sample(model, x, y, mask, size_args, SCHEDULE)
        other = sample(model, x * -1.0, y, mask, size_args, SCHEDULE)
    np.testing.assert_array_equal(again, first)  # nothing of the first run leaks into the second
    assert cache.runs == 3
    assert np.abs(first - uncached).max() > 1e-3  # the schedule did reuse
    steps = len(SCHEDULE)
    assert sum(cache.computed.values()) == 3 * len(attention_layers(model))  # the first step of each run
    assert sum(cache.reused.values()) == 3 * (steps - 1) * len(attention_layers(model))
    assert not np.allclose(other, first)


def test_a_new_batch_layout_starts_a_new_run_and_the_doubled_batch_is_what_is_stored():
    model = tiny_stdit2()
    x, y, mask, size_args = batch(size=2)
    with model.attention_cache_enabled(REUSE_ALL) as cache:
        sample(model, x, y, mask, size_args, SCHEDULE[:2])
        stored = {key: value.shape[0] for key, value in cache.outputs.items()}
        assert set(stored.values()) == {4}  # [conditional, unconditional] of 2 videos
        # the next timestep is lower, but a batch of one video cannot reuse outputs of two
        x1, y1, mask1, size1 = batch(size=1)
        single = step(model, x1, 800, y1, mask1, size1)
    np.testing.assert_array_equal(single, step(model, x1, 800, y1, mask1, size1))
    assert cache.runs == 2


def test_conditioning_frames_reuse_like_the_others():
    model = tiny_stdit2()
    x, y, mask, size_args = batch(size=2)
    x_mask = paddle.to_tensor([[False, True, True], [True, True, False]])
    x_next = x * 0.9 + 0.3
    kinds = ("spatial", "temporal", "cross")
    stored = {}
    with_attention_outputs_replaced(model, stored, kinds, lambda: step(model, x, 1000, y, mask, size_args, x_mask))
    expected = with_attention_outputs_replaced(
        model, stored, kinds, lambda: step(model, x_next, 900, y, mask, size_args, x_mask)
    )
    with model.attention_cache_enabled(REUSE_ALL):
        step(model, x, 1000, y, mask, size_args, x_mask)
        np.testing.assert_allclose(step(model, x_next, 900, y, mask, size_args, x_mask), expected, rtol=1e-6, atol=1e-6)

    # and through the guided sampler: the given frame's latents stay exactly as given
    with model.attention_cache_enabled("fast"):
        z = sample(model, x[:1], y[:1], mask[:1], {k: v[:1] for k, v in size_args.items()}, SCHEDULE, x_mask[:1])
    assert np.isfinite(z).all()


def test_training_mode_computes_everything():
    model = tiny_stdit2()
    x, y, mask, size_args = batch()
    with model.attention_cache_enabled(REUSE_ALL) as cache:
        model.train()
        model(x, paddle.full([2], 900.0), y, mask, **size_args)
        model(x, paddle.full([2], 800.0), y, mask, **size_args)
    assert not cache.computed and not cache.reused


# ------------------------------------------------------------------------------------------------ configs


def test_presets_reuse_cross_attention_most_and_spatial_least():
    for name, config in ATTENTION_CACHE_PRESETS.items():
        assert config.spatial.interval <= config.temporal.interval <= config.cross.interval, name
    assert AttentionCache("balanced").config is ATTENTION_CACHE_PRESETS["balanced"]


@pytest.mark.parametrize(
    "config, message",
    [
        ("turbo", "not a preset (quality, balanced, fast)"),
        (3, "not a preset"),
        (dict(spatial=Broadcast((100, 900), 0)), "spatial interval 0 must be a whole number >= 1"),
        (dict(temporal=Broadcast((100, 900), 2.5)), "temporal interval 2.5"),
        (dict(cross=Broadcast((900, 100), 2)), "cross timesteps (900, 100) must be two numbers (low, high) with low < h"),
        (dict(cross=Broadcast((100,), 2)), "cross timesteps (100,)"),
        (dict(spatial=(100, 900, 2)), "spatial is (100, 900, 2); give a Broadcast"),
    ],
)
def test_bad_configs_are_user_errors(config, message):
    model = tiny_stdit2()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model.enable_attention_cache(AttentionCacheConfig(**config) if isinstance(config, dict) else config)
    assert model.attention_cache is None
