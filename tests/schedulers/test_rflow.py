import numpy as np
import paddle
import pytest

from schedulers.rflow import RFLOW, timestep_transform


def test_timestep_transform_matches_numpy():
    t = np.array([1000.0, 700.0, 250.0, 10.0], dtype="float32")
    height, width, frames = np.array([256.0, 480, 64, 64]), np.array([256.0, 854, 64, 96]), np.array([16.0, 15, 1, 16])
    ours = timestep_transform(
        paddle.to_tensor(t), paddle.to_tensor(height), paddle.to_tensor(width), paddle.to_tensor(frames), 1000
    ).numpy()
    ratio = np.sqrt(height * width / 512**2) * np.sqrt(frames)
    s = t / 1000
    np.testing.assert_allclose(ours, ratio * s / (1 + (ratio - 1) * s) * 1000, rtol=1e-5)
    # one latent frame count for the whole batch, as the samplers pass it
    single = timestep_transform(paddle.to_tensor(t), paddle.to_tensor(height), paddle.to_tensor(width), 5, 1000).numpy()
    ratio = np.sqrt(height * width / 512**2) * np.sqrt(5)
    np.testing.assert_allclose(single, ratio * s / (1 + (ratio - 1) * s) * 1000, rtol=1e-5)


def test_add_noise_convention():
    flow = RFLOW()
    x, noise = paddle.full([3, 1], 2.0), paddle.full([3, 1], -1.0)
    out = flow.add_noise(x, noise, paddle.to_tensor([0.0, 250.0, 1000.0])).numpy().ravel()
    np.testing.assert_allclose(out, [2.0, 0.75 * 2 - 0.25, -1.0])


def test_euler_steps_and_timestep_grid(text_encoder, make_fake_model, size_args):
    flow = RFLOW(num_sampling_steps=4, cfg_scale=1.0)
    assert flow.sampling_timesteps() == [1000.0, 750.0, 500.0, 250.0]
    model = make_fake_model(out_factor=1)
    z = paddle.ones([1, 2, 3, 1, 1])
    out = flow.sample(model, text_encoder, z, ["abc"], size_args(1), progress=False)
    # velocity = 0.5 z + 0.03 (caption offset, cfg 1 = conditional); dt = 0.25 each step
    expected = np.ones(1)
    for _ in range(4):
        expected = expected + 0.25 * (0.5 * expected + 0.03)
    np.testing.assert_allclose(out.numpy().ravel(), np.repeat(expected, 6), rtol=1e-5)
    assert [float(call["timestep"][0]) for call in model.calls] == [1000.0, 750.0, 500.0, 250.0]
    # a batch of two, a model with a second (variance) half that is ignored, and the guidance scale per call
    two = flow.sample(make_fake_model(out_factor=2), text_encoder, paddle.ones([2, 2, 3, 1, 1]), ["abc", "abc"], size_args(2), progress=False)
    np.testing.assert_allclose(two.numpy().ravel(), np.repeat(expected, 12), rtol=1e-5)
    guided = flow.sample(make_fake_model(out_factor=1), text_encoder, z, ["abc"], size_args(1), progress=False, cfg_scale=2.0)
    expected = np.ones(1)
    for _ in range(4):
        expected = expected + 0.25 * (0.5 * expected + 2.0 * 0.03)
    np.testing.assert_allclose(guided.numpy().ravel(), np.repeat(expected, 6), rtol=1e-5)


class MaskReadingModel(paddle.nn.Layer):
    """Velocity 0.5 x + caption offset on frames the model is told are generated, plus `poison` on frames it is
    told are conditions: a frame the sampler moves while telling the model it is a condition goes astray."""

    def __init__(self, poison=100.0):
        super().__init__()
        self.poison = poison
        self.x_masks = []

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        self.x_masks.append(x_mask.numpy().copy())
        offset = y.mean(axis=[1, 2, 3]).reshape([-1, 1, 1, 1, 1]) * 0.01
        told_condition = (~x_mask).astype(x.dtype)[:, None, :, None, None]
        return x * 0.5 + offset + self.poison * told_condition


def test_masked_sampling_keeps_hard_conditions_and_is_deterministic(text_encoder, size_args):
    flow = RFLOW(num_sampling_steps=6, use_timestep_transform=True, cfg_scale=4.0)
    mask = paddle.to_tensor([[0.0, 1.0, 0.5, 1.0]])

    def run():
        paddle.seed(3)
        z = paddle.randn([1, 4, 4, 2, 2])
        return z, flow.sample(MaskReadingModel(), text_encoder, z.clone(), ["p"], size_args(1), mask=mask, progress=False)

    z, first = run()
    _, second = run()
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    np.testing.assert_array_equal(first[:, :, 0].numpy(), z[:, :, 0].numpy())
    # Generated frames follow Euler steps on Open-Sora v1.2's shifted grid: ratio sqrt(64*64/512^2) * sqrt(4) = 0.25
    s = np.array([1 - i / 6 for i in range(6)] + [0.0])
    grid = 0.25 * s / (1 + (0.25 - 1) * s)
    guided_offset = 4.0 * 0.01 * len("p")  # uncond + 4 (cond - uncond); the null caption's offset is 0
    expected = z.numpy()[:, :, [1, 3]].astype("float64")
    for t, t_next in zip(grid[:-1], grid[1:]):
        expected = expected + (0.5 * expected + guided_offset) * (t - t_next)
    np.testing.assert_allclose(first.numpy()[:, :, [1, 3]], expected, rtol=1e-5, atol=1e-5)
    # the edited frame was re-noised and generated, never moved as a condition
    edited = first.numpy()[:, :, 2]
    assert not np.allclose(edited, z.numpy()[:, :, 2]) and np.abs(edited).max() < 10


def test_model_is_told_a_frame_is_generated_from_the_step_that_reaches_it():
    """v1.2 rule inside the sampler: frame generated when m*T >= t, so the step that re-noises it is a generating one."""
    flow = RFLOW(num_sampling_steps=4, cfg_scale=1.0)
    model = MaskReadingModel(poison=1000.0)
    z = paddle.zeros([1, 1, 4, 1, 1])

    class NoText:
        def encode(self, prompts):
            return {"y": paddle.ones([1, 1, 1, 1]), "mask": paddle.ones([1, 1], dtype="int64")}

        def null(self, n):
            return paddle.zeros([n, 1, 1, 1])

    out = flow.sample(model, NoText(), z, ["p"], {}, mask=paddle.to_tensor([[0.0, 1.0, 0.5, 0.25]]), progress=False)
    # grid 1000, 750, 500, 250; thresholds m*T = 0, 1000, 500, 250 (frame 0 is a hard condition)
    expected = [[False, True, False, False], [False, True, False, False], [False, True, True, False], [False, True, True, True]]
    assert [x_mask[0].tolist() for x_mask in model.x_masks] == expected
    assert all((x_mask[0] == x_mask[1]).all() for x_mask in model.x_masks)  # both halves of the CFG batch
    assert np.abs(out.numpy()).max() < 10


def test_training_loss_ignores_conditioning_frames_and_timestep_sampling():
    flow = RFLOW(sample_method="logit-normal")
    paddle.seed(0)
    t = flow.sample_training_timesteps(20000).numpy()
    assert 0 < t.min() and t.max() < 1000 and np.median(t) == pytest.approx(500, abs=15)
    x = paddle.randn([2, 4, 3, 2, 2])
    mask = paddle.to_tensor([[False, True, True], [True, True, False]])

    class Model(paddle.nn.Layer):
        def __init__(self, poison):
            super().__init__()
            self.poison = poison

        def forward(self, x, t, x_mask=None, **kwargs):
            return paddle.where(x_mask[:, None, :, None, None], x * 0.1, x * 0.1 + 50.0) if self.poison else x * 0.1

    noise = paddle.randn(x.shape)
    t = paddle.to_tensor([100.0, 900.0])
    clean = flow.training_losses(Model(False), x, {}, mask=mask, t=t, noise=noise)["loss"]
    poisoned = flow.training_losses(Model(True), x, {}, mask=mask, t=t, noise=noise)["loss"]
    np.testing.assert_allclose(clean.numpy(), poisoned.numpy(), rtol=1e-6)
    # against a direct computation for sample 0
    x_np, n_np = x.numpy()[0], noise.numpy()[0]
    x_t = 0.9 * x_np + 0.1 * n_np
    x_t[:, 0] = x_np[:, 0]
    expected = ((0.1 * x_t - (x_np - n_np)) ** 2)[:, 1:].mean()
    assert float(clean[0]) == pytest.approx(expected, rel=1e-5)


def shifted(t, height, width, latent_frames, num_timesteps=1000, scale=1.0, base_frames=1):
    """Open-Sora v1.2's timestep shift in numpy."""
    ratio = np.sqrt(height * width / 512**2) * np.sqrt(latent_frames / base_frames) * scale
    s = t / num_timesteps
    return ratio * s / (1 + (ratio - 1) * s) * num_timesteps


def test_timestep_transform_defaults_scale_and_base_frames():
    t, size = np.array([900.0, 300.0], dtype="float32"), np.array([256.0, 512.0])
    tensors = [paddle.to_tensor(v) for v in (t, size, size, np.array([16.0, 9.0]))]
    np.testing.assert_allclose(timestep_transform(*tensors, 1000).numpy(), shifted(t, size, size, np.array([16.0, 9.0])), rtol=1e-5)
    ours = timestep_transform(*tensors, 1000, scale=3.0, base_num_frames=4).numpy()
    np.testing.assert_allclose(ours, shifted(t, size, size, np.array([16.0, 9.0]), scale=3.0, base_frames=4), rtol=1e-5)
    flow = RFLOW(transform_scale=2.0)
    # v1.2's VAE makes 51 frames into 15 latent frames: the shift counts the latents, not the pixel frames
    size_args = dict(height=paddle.to_tensor(size), width=paddle.to_tensor(size), num_frames=paddle.to_tensor([51.0, 51.0]))
    np.testing.assert_allclose(flow.transform(paddle.to_tensor(t), size_args, 15).numpy(),
                               shifted(t, size, size, 15, scale=2.0), rtol=1e-5)


def test_defaults_are_open_sora_v12s():
    flow = RFLOW()
    assert len(flow.sampling_timesteps()) == 30 and flow.cfg_scale == 4.0 and flow.num_timesteps == 1000
    assert (flow.sample_method, flow.use_discrete_timesteps, flow.use_timestep_transform) == ("uniform", False, False)
    paddle.seed(0)
    t = RFLOW(sample_method="logit-normal").sample_training_timesteps(20000).numpy() / 1000
    logits = np.log(t / (1 - t))
    assert abs(logits.mean()) < 0.03 and logits.std() == pytest.approx(1.0, abs=0.03)  # loc 0, scale 1


def test_bad_sampling_options_are_refused():
    with pytest.raises(ValueError, match="sample_method 'gaussian' is not one of"):
        RFLOW(sample_method="gaussian")
    with pytest.raises(ValueError, match="discrete timesteps are drawn uniformly"):
        RFLOW(use_discrete_timesteps=True, sample_method="logit-normal")
    RFLOW(use_discrete_timesteps=True, sample_method="uniform")


def test_uniform_and_discrete_training_timesteps_and_discrete_grid():
    paddle.seed(0)
    uniform = RFLOW(sample_method="uniform").sample_training_timesteps(20000).numpy()
    assert uniform.shape == (20000,) and 0 <= uniform.min() and uniform.max() < 1000
    assert uniform.mean() == pytest.approx(500, abs=10) and uniform.std() == pytest.approx(1000 / np.sqrt(12), abs=10)
    discrete_flow = RFLOW(num_sampling_steps=3, use_discrete_timesteps=True)
    discrete = discrete_flow.sample_training_timesteps(5000)
    values = discrete.numpy()
    assert discrete.dtype == paddle.float32 and np.all(values == np.round(values))
    assert values.min() == 0 and values.max() == 999
    assert discrete_flow.sampling_timesteps() == [1000.0, 667.0, 333.0]


class RecordingVelocity(paddle.nn.Layer):
    def forward(self, x, t, **kwargs):
        self.t = t.numpy().copy()
        return x * 0.1


def test_training_draws_shifted_timesteps_and_noise_when_not_given(size_args):
    flow = RFLOW(sample_method="logit-normal", use_timestep_transform=True, transform_scale=2.0)
    x = paddle.randn([3, 4, 4, 2, 2])
    paddle.seed(5)
    raw = flow.sample_training_timesteps(3).numpy()
    noise = paddle.randn(x.shape)
    model = RecordingVelocity()
    paddle.seed(5)
    # 13 pixel frames in 4 latent frames (a 3-D VAE's compression): the shift counts the 4 latent frames
    loss = flow.training_losses(model, x, {**size_args(3), "num_frames": paddle.full([3], 13.0)})["loss"].numpy()
    np.testing.assert_allclose(model.t, shifted(raw, 64.0, 64.0, 4.0, scale=2.0), rtol=1e-5)
    s = (model.t / 1000).reshape([-1, 1, 1, 1, 1])
    x_t = (1 - s) * x.numpy() + s * noise.numpy()
    expected = ((0.1 * x_t - (x.numpy() - noise.numpy())) ** 2).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_timestep_weights_scale_each_samples_loss():
    flow = RFLOW()
    x, noise = paddle.randn([2, 4, 3, 2, 2]), paddle.randn([2, 4, 3, 2, 2])
    t = paddle.to_tensor([100.0, 900.0])
    weights = np.linspace(0.5, 2.0, 1000)
    plain = flow.training_losses(RecordingVelocity(), x, {}, t=t, noise=noise)["loss"].numpy()
    weighted = flow.training_losses(RecordingVelocity(), x, {}, t=t, noise=noise, weights=weights)["loss"].numpy()
    np.testing.assert_allclose(weighted, plain * weights[[100, 900]], rtol=1e-5)


def test_progress_bar_is_named_rflow_shown_by_default_and_cleared(text_encoder, make_fake_model, size_args, capsys):
    flow = RFLOW(num_sampling_steps=3, cfg_scale=1.0)
    z = paddle.ones([1, 2, 3, 1, 1])
    flow.sample(make_fake_model(out_factor=1), text_encoder, z, ["abc"], size_args(1))
    shown = capsys.readouterr().err
    assert shown.startswith("\rrflow:") and "0/3" in shown
    # leave=False: the bar is wiped at the end instead of leaving a finished line behind
    assert shown.endswith("\r") and shown.rsplit("\r", 2)[-2].strip() == ""
    flow.sample(make_fake_model(out_factor=1), text_encoder, z, ["abc"], size_args(1), progress=False)
    assert capsys.readouterr().err == ""


class CaptionEncodingModel(paddle.nn.Layer):
    """A model that precomputes its caption keys/values: `forward` gets only what `encode_caption` returned."""

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        assert mask is None and isinstance(y, dict), "the sampler must pass the encoded caption, not the raw one"
        return x * 0.5 + y["offset"].reshape([-1, 1, 1, 1, 1])

    def encode_caption(self, y, mask):
        assert mask.shape == [1, 3]  # the prompt's mask, once for the doubled batch
        return {"offset": y.mean(axis=[1, 2, 3]) * 0.1}


def test_models_with_encode_caption_get_their_encoded_captions(text_encoder, size_args):
    flow = RFLOW(num_sampling_steps=2, cfg_scale=3.0)
    out = flow.sample(CaptionEncodingModel(), text_encoder, paddle.ones([1, 2, 3, 1, 1]), ["abc"], size_args(1), progress=False)
    expected = 1.0
    for _ in range(2):  # caption offset 0.3 (conditional), 0 (null), guided by 3
        expected = expected + 0.5 * (0.5 * expected + 3.0 * 0.3)
    np.testing.assert_allclose(out.numpy().ravel(), np.full(6, expected), rtol=1e-5)


def test_guidance_covers_every_latent_channel(text_encoder, make_fake_model, size_args):
    # more channels than frames: guiding as many channels as there are frames would leave channels 1-3 unguided
    flow = RFLOW(num_sampling_steps=2, cfg_scale=3.0)
    z = paddle.ones([1, 4, 1, 2, 2])
    out = flow.sample(make_fake_model(out_factor=2), text_encoder, z, ["abc"], size_args(1), progress=False)
    expected = 1.0
    for _ in range(2):
        expected = expected + 0.5 * (0.5 * expected + 3.0 * 0.03)
    np.testing.assert_allclose(out.numpy().ravel(), np.full(16, expected), rtol=1e-5)


def test_config_rebuilds_the_scheduler_and_steps_can_be_changed():
    given = dict(num_sampling_steps=7, num_timesteps=500, cfg_scale=2.5, use_discrete_timesteps=False,
                 use_timestep_transform=True, sample_method="logit-normal", loc=0.3, scale=1.7, transform_scale=6.0)
    flow = RFLOW(**given)
    assert flow.config == given
    assert RFLOW(**flow.config).config == given
    fewer = flow.with_sampling_steps(3)
    assert fewer.config == {**given, "num_sampling_steps": 3} and fewer.num_inference_steps == 3
    assert flow.num_inference_steps == 7  # the original is left as it was


def test_step_callback_sees_every_step_and_can_replace_the_latents(text_encoder, make_fake_model, size_args):
    flow = RFLOW(num_sampling_steps=3, cfg_scale=1.0)
    seen = []

    def callback(step_index, t, z):
        seen.append((step_index, float(t[0])))
        return z * 0 if step_index == 2 else z

    out = flow.sample(make_fake_model(out_factor=1), text_encoder, paddle.ones([1, 2, 3, 1, 1]), ["abc"], size_args(1),
                      progress=False, step_callback=callback)
    assert [step for step, _ in seen] == [0, 1, 2]
    np.testing.assert_allclose([t for _, t in seen], [1000.0, 2000.0 / 3, 1000.0 / 3], rtol=1e-6)
    assert float(out.abs().max()) == 0.0
