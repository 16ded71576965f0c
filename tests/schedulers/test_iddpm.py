import numpy as np
import paddle
import pytest

from schedulers.iddpm import IDDPM, linear_betas, space_timesteps


def test_linear_betas_and_respacing_keep_the_base_noise_levels():
    betas = linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    base = np.cumprod(1 - betas)
    diffusion = IDDPM(num_sampling_steps=100)
    assert diffusion.num_timesteps == 100
    assert diffusion.timestep_map[0] == 0 and diffusion.timestep_map[-1] == 999
    np.testing.assert_allclose(diffusion.alphas_cumprod, base[diffusion.timestep_map], rtol=1e-12)
    # respaced betas chain back to the same cumulative product
    np.testing.assert_allclose(np.cumprod(1 - diffusion.betas), diffusion.alphas_cumprod, rtol=1e-10)


def test_space_timesteps_forms():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10") == [round(11 * k) for k in range(10)]
    sections = space_timesteps(300, "10,15,20")
    assert len(sections) == 45 and sections[0] == 0 and sections[-1] == 299
    with pytest.raises(ValueError):
        space_timesteps(10, "11")
    # uneven sections (4, 3, 3 steps) and sections of one and two steps
    assert space_timesteps(10, "2,2,2") == [0, 3, 4, 6, 7, 9]
    assert space_timesteps(10, "1,2") == [0, 5, 9]
    assert space_timesteps(10, "ddim10") == list(range(10))


def test_q_sample_statistics():
    diffusion = IDDPM()
    x = paddle.full([20000], 2.0)
    t = paddle.full([20000], 500, dtype="int64")
    samples = diffusion.q_sample(x, t, paddle.randn([20000])).numpy()
    a = np.cumprod(1 - linear_betas(1000))[500]
    assert samples.mean() == pytest.approx(2 * np.sqrt(a), abs=0.03)
    assert samples.std() == pytest.approx(np.sqrt(1 - a), abs=0.03)


def test_p_mean_variance_matches_numpy():
    diffusion = IDDPM(num_sampling_steps=50)
    rng = np.random.default_rng(0)
    x = rng.standard_normal([2, 3, 1, 2, 2]).astype("float32")
    out = rng.standard_normal([2, 6, 1, 2, 2]).astype("float32").clip(-1, 1)
    t = 17
    mean, log_var, x0 = diffusion.p_mean_variance(paddle.to_tensor(out), paddle.to_tensor(x), t)
    acp = diffusion.alphas_cumprod[t]
    acp_prev = diffusion.alphas_cumprod[t - 1]
    beta = 1 - acp / acp_prev
    eps = out[:, :3]
    x0_np = (x - np.sqrt(1 - acp) * eps) / np.sqrt(acp)
    mean_np = beta * np.sqrt(acp_prev) / (1 - acp) * x0_np + (1 - acp_prev) * np.sqrt(1 - beta) / (1 - acp) * x
    post_var = beta * (1 - acp_prev) / (1 - acp)
    frac = (out[:, 3:] + 1) / 2
    log_var_np = frac * np.log(beta) + (1 - frac) * np.log(post_var)
    np.testing.assert_allclose(x0.numpy(), x0_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean.numpy(), mean_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(log_var.numpy(), log_var_np, rtol=1e-4)


def test_sampling_shapes_determinism_cfg_and_hard_conditions(text_encoder, make_fake_model, size_args):
    diffusion = IDDPM(num_sampling_steps=5, cfg_scale=3.0, cfg_channel=3)
    reference = paddle.randn([2, 4, 3, 2, 2])

    def run():
        paddle.seed(7)
        model = make_fake_model(out_factor=2)
        z = paddle.randn([2, 4, 3, 2, 2])
        z[:, :, 0] = reference[:, :, 0]
        mask = paddle.to_tensor([[0.0, 1.0, 1.0], [0.0, 0.4, 1.0]])
        return diffusion.sample(model, text_encoder, z, ["a", "bb"], size_args(2), mask=mask, progress=False), model

    first, model = run()
    second, _ = run()
    assert first.shape == [2, 4, 3, 2, 2]
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    np.testing.assert_array_equal(first[:, :, 0].numpy(), reference[:, :, 0].numpy())
    # one model call per step, on the doubled batch, with respaced -> original timesteps
    assert len(model.calls) == 5 and all(call["batch"] == 4 for call in model.calls)
    assert [int(call["timestep"][0]) for call in model.calls] == sorted(diffusion.timestep_map, reverse=True)
    assert not model.calls[0]["x_mask"][:, 0].any()


def test_guidance_applies_to_the_first_cfg_channels_only():
    from schedulers.guidance import guided_prediction

    class Split(paddle.nn.Layer):
        def forward(self, x, t, y=None, x_mask=None, **kwargs):
            # conditional half outputs 1, unconditional 0
            return paddle.concat([paddle.ones_like(x[:1]), paddle.zeros_like(x[1:])], axis=0)

    out = guided_prediction(Split(), paddle.zeros([1, 4, 1, 1, 1]), paddle.zeros([1]), {"y": paddle.zeros([2, 1, 1, 1])}, {}, None, 5.0, 3)
    assert out.numpy().ravel().tolist() == [5.0, 5.0, 5.0, 1.0]


def test_training_loss_is_finite_and_ignores_conditioning_frames():
    diffusion = IDDPM()
    x = paddle.randn([2, 4, 3, 2, 2])
    mask = paddle.to_tensor([[False, True, True], [True, True, False]])
    t = paddle.to_tensor([10, 600])
    noise = paddle.randn(x.shape)

    class Model(paddle.nn.Layer):
        def __init__(self, poison):
            super().__init__()
            self.poison = poison

        def forward(self, x, t, x_mask=None, **kwargs):
            out = paddle.concat([x * 0.3, paddle.zeros_like(x)], axis=1)
            if self.poison:  # change the output at conditioning frames only
                out = paddle.where(x_mask[:, None, :, None, None], out, out + 50.0)
            return out

    clean = diffusion.training_losses(Model(False), x, {}, mask=mask, t=t, noise=noise)
    poisoned = diffusion.training_losses(Model(True), x, {}, mask=mask, t=t, noise=noise)
    assert np.isfinite(clean["loss"].numpy()).all() and clean["loss"].shape == [2]
    np.testing.assert_allclose(clean["loss"].numpy(), poisoned["loss"].numpy(), rtol=1e-6)
    # at t = 0 the bound is the decoder likelihood, over generated frames too
    t0 = paddle.to_tensor([0, 0])
    clean = diffusion.training_losses(Model(False), x, {}, mask=mask, t=t0, noise=noise)
    poisoned = diffusion.training_losses(Model(True), x, {}, mask=mask, t=t0, noise=noise)
    np.testing.assert_allclose(clean["vb"].numpy(), poisoned["vb"].numpy(), rtol=1e-6)
    assert set(clean) == {"loss", "mse", "vb"}


def posterior_variance_np(alphas_cumprod):
    """beta_t (1 - abar_{t-1}) / (1 - abar_t) of the respaced process, from its cumulative alphas alone."""
    previous = np.append(1.0, alphas_cumprod[:-1])
    betas = 1 - alphas_cumprod / previous
    return betas, betas * (1 - previous) / (1 - alphas_cumprod)


@pytest.mark.parametrize("steps", [1000, 50])
def test_posterior_log_variance_is_clipped_at_t0_to_the_t1_value(steps):
    diffusion = IDDPM(num_sampling_steps=steps)
    betas, variance = posterior_variance_np(np.cumprod(1 - linear_betas(1000))[diffusion.timestep_map])
    assert variance[0] == 0  # why the clip exists: log(0) would be -inf
    np.testing.assert_allclose(diffusion.posterior_log_variance_clipped[0], np.log(variance[1]), rtol=1e-12)
    np.testing.assert_allclose(diffusion.posterior_log_variance_clipped[1:], np.log(variance[1:]), rtol=1e-12)
    np.testing.assert_allclose(diffusion.log_betas_large, np.log(np.append(variance[1], betas[1:])), rtol=1e-12)
    np.testing.assert_allclose(diffusion.log_betas, np.log(betas), rtol=1e-12)
    # the learned range at t = 0 spans [log var_1, log beta_0]; out = -1 picks the clipped minimum
    x = paddle.zeros([1, 2, 1, 1, 1])
    out = paddle.concat([paddle.zeros_like(x), paddle.full_like(x, -1.0)], axis=1)
    for t in (0, paddle.to_tensor([0])):
        _, log_var, _ = diffusion.p_mean_variance(out, x, t)
        np.testing.assert_allclose(log_var.numpy() if hasattr(log_var, "numpy") else log_var, np.log(variance[1]), rtol=1e-6)


class CaptionModel(paddle.nn.Layer):
    """eps = the caption's mean (the fake encoder's prompt length; 0 for the null caption), variance fraction 1/2:
    the sampler's arithmetic and its guidance alone decide the output. Records the frame masks it is given."""

    def __init__(self):
        super().__init__()
        self.x_masks = []

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        self.x_masks.append(None if x_mask is None else x_mask.numpy().tolist())
        eps = paddle.zeros_like(x) + y.mean(axis=[1, 2, 3]).reshape([-1, 1, 1, 1, 1])
        return paddle.concat([eps, paddle.zeros_like(x)], axis=1)


def test_only_the_steps_before_t0_add_noise_and_guidance_covers_the_cfg_channels(text_encoder, size_args, monkeypatch):
    """Two steps from z = 0: the output is the t = 1 noise and the guided eps through known factors, exactly."""
    draws = []
    randn = paddle.randn

    def recording_randn(*args, **kwargs):
        draws.append(randn(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(paddle, "randn", recording_randn)
    diffusion = IDDPM(num_sampling_steps=2, cfg_scale=1.0, cfg_channel=1)
    out = diffusion.sample(CaptionModel(), text_encoder, paddle.zeros([1, 2, 3, 4, 4]), ["ab"], size_args(1), progress=False,
                           cfg_scale=5.0).numpy()
    acp = np.cumprod(1 - linear_betas(1000))[diffusion.timestep_map]
    betas, variance = posterior_variance_np(acp)
    # guided eps: uncond + 5 (cond - uncond) = 10 on the first (cfg) channel, the conditional 2 on the other
    eps = np.array([10.0, 2.0]).reshape([1, 2, 1, 1, 1])
    # t = 1 from z = 0: x0 = -sqrt(1 - abar_1) eps / sqrt(abar_1), mean = coef1 x0; std exp(log_var / 2) with
    # log_var halfway (fraction 1/2) between the log posterior variance and log beta
    coef1 = betas[1] * np.sqrt(acp[0]) / (1 - acp[1])
    z1_mean = coef1 * (-np.sqrt(1 - acp[1]) * eps / np.sqrt(acp[1]))
    std_1 = np.exp(0.25 * (np.log(variance[1]) + np.log(betas[1])))
    noise = [draw.numpy() for draw in draws if draw.shape == [1, 2, 3, 4, 4]]
    z1 = z1_mean + std_1 * noise[0]
    # t = 0: with abar_prev = 1 the mean is x0 = (z1 - sqrt(1 - abar_0) eps) / sqrt(abar_0); nothing random is added
    np.testing.assert_allclose(out, (z1 - np.sqrt(1 - acp[0]) * eps) / np.sqrt(acp[0]), rtol=1e-5, atol=1e-6)


def test_v11_model_mask_rule_inside_the_sampler(text_encoder, size_args):
    # 10 steps; frame 2's threshold is floor(0.45 * 10) = 4 and the model is told it is generated only below it
    model = CaptionModel()
    IDDPM(num_sampling_steps=10).sample(model, text_encoder, paddle.zeros([1, 2, 3, 1, 1]), ["a"], size_args(1),
                                        mask=paddle.to_tensor([[1.0, 0.0, 0.45]]), progress=False)
    expected = [[[True, False, t < 4]] * 2 for t in range(9, -1, -1)]  # both halves of the CFG batch
    assert model.x_masks == expected


def np_cdf(x):
    """The tanh approximation of the standard normal CDF used by improved DDPM, in numpy."""
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_log(p):
    return np.log(np.maximum(p, 1e-12))  # improved DDPM floors bin probabilities at 1e-12


def test_kl_cdf_and_discretized_likelihood_match_their_formulas():
    from math import erf

    from schedulers.iddpm.gaussian_diffusion import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl

    rng = np.random.default_rng(1)
    m1, m2, lv1, lv2 = (rng.uniform(-1.5, 1.5, 50) for _ in range(4))
    kl = normal_kl(*(paddle.to_tensor(v) for v in (m1, lv1, m2, lv2))).numpy()
    v1, v2 = np.exp(lv1), np.exp(lv2)
    np.testing.assert_allclose(kl, 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2 * v2) - 0.5, rtol=1e-6, atol=1e-9)

    x = np.linspace(-4, 4, 81)
    exact = np.array([0.5 * (1 + erf(v / np.sqrt(2))) for v in x])
    np.testing.assert_allclose(approx_standard_normal_cdf(paddle.to_tensor(x)).numpy(), exact, atol=3e-4)

    # data on the 256-level grid, including both edge bins, which take the whole tail
    data = np.array([-1.0, -1.0, 1.0, 1.0, 0.0, 2 / 255 * 10 - 1, 0.5])
    means, log_scales = rng.uniform(-1, 1, 7), np.log(rng.uniform(0.02, 0.5, 7))
    ours = discretized_gaussian_log_likelihood(*(paddle.to_tensor(v) for v in (data, means, log_scales))).numpy()
    upper = np_cdf((data - means + 1 / 255) / np.exp(log_scales))
    lower = np_cdf((data - means - 1 / 255) / np.exp(log_scales))
    expected = np.where(data < -0.999, np_log(upper), np.where(data > 0.999, np_log(1 - lower), np_log(upper - lower)))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


class AffineModel(paddle.nn.Layer):
    """eps = 0.3 x_t and a variance fraction from tanh(x_t), so every term of the loss is exercised."""

    def forward(self, x, timestep, x_mask=None, **kwargs):
        self.timestep = timestep.numpy().copy()
        return paddle.concat([x * 0.3, paddle.tanh(x)], axis=1)


def test_training_loss_and_variational_bound_match_numpy():
    diffusion = IDDPM()
    rng = np.random.default_rng(2)
    x0 = rng.uniform(-1, 1, [2, 2, 2, 2, 2]).round(2)
    noise = rng.standard_normal(x0.shape)
    t = np.array([0, 400])
    model = AffineModel()
    terms = diffusion.training_losses(model, paddle.to_tensor(x0, dtype="float32"), {}, t=paddle.to_tensor(t),
                                      noise=paddle.to_tensor(noise, dtype="float32"))
    np.testing.assert_array_equal(model.timestep, t)
    betas = linear_betas(1000)
    acp = np.cumprod(1 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    shape = [-1, 1, 1, 1, 1]
    a, a_prev, beta = acp[t].reshape(shape), acp_prev[t].reshape(shape), betas[t].reshape(shape)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    eps = 0.3 * x_t
    np.testing.assert_allclose(terms["mse"].numpy(), ((noise - eps) ** 2).reshape(2, -1).mean(1), rtol=1e-5)

    post_var = beta * (1 - a_prev) / (1 - a)
    post_log_var = np.log(np.where(t.reshape(shape) == 0, betas[1] * (1 - acp[0]) / (1 - acp[1]), post_var))
    coef1, coef2 = beta * np.sqrt(a_prev) / (1 - a), (1 - a_prev) * np.sqrt(1 - beta) / (1 - a)
    frac = (np.tanh(x_t) + 1) / 2
    log_var = frac * np.log(beta) + (1 - frac) * post_log_var
    pred_x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
    mean = coef1 * pred_x0 + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    kl = 0.5 * (-1 + log_var - post_log_var + np.exp(post_log_var - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
    scale = np.exp(0.5 * log_var)
    upper, lower = np_cdf((x0 - mean + 1 / 255) / scale), np_cdf((x0 - mean - 1 / 255) / scale)
    nll = -np.where(x0 < -0.999, np_log(upper), np.where(x0 > 0.999, np_log(1 - lower), np_log(upper - lower)))
    expected_vb = [nll[0].mean() / np.log(2), kl[1].mean() / np.log(2)]  # decoder NLL at t = 0, KL after
    np.testing.assert_allclose(terms["vb"].numpy(), expected_vb, rtol=1e-4)
    np.testing.assert_allclose(terms["loss"].numpy(), terms["mse"].numpy() + terms["vb"].numpy(), rtol=1e-6)

    weights = np.linspace(1.0, 3.0, 1000)
    weighted = diffusion.training_losses(AffineModel(), paddle.to_tensor(x0, dtype="float32"), {}, t=paddle.to_tensor(t),
                                         noise=paddle.to_tensor(noise, dtype="float32"), weights=weights)
    np.testing.assert_allclose(weighted["mse"].numpy(), terms["mse"].numpy() * weights[t], rtol=1e-5)


def test_training_draws_timesteps_over_the_whole_process_and_noise_when_not_given():
    diffusion = IDDPM(learn_sigma=False)
    model = AffineModel()
    paddle.seed(0)
    loss = diffusion.training_losses(lambda x, t, **kw: model(x, t)[:, :2], paddle.zeros([400, 2, 1, 1, 1]), {})
    assert set(loss) == {"loss", "mse"} and loss["loss"].shape == [400]
    assert model.timestep.min() < 30 and model.timestep.max() > 970 and np.all(model.timestep == np.round(model.timestep))
    # x0 = 0: x_t = sqrt(1 - abar_t) noise and eps = 0.3 x_t, so the loss is E[(1 - 0.3 sqrt(1 - abar_t))^2 noise^2]
    factor = (1 - 0.3 * np.sqrt(1 - np.cumprod(1 - linear_betas(1000))[model.timestep.astype(int)])) ** 2
    assert loss["mse"].numpy().mean() / factor.mean() == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("sigma_small", [True, False, None])
def test_fixed_variances(sigma_small):
    options = {} if sigma_small is None else dict(sigma_small=sigma_small)  # improved DDPM's default: the large one
    diffusion = IDDPM(num_sampling_steps=10, learn_sigma=False, **options)
    betas, variance = posterior_variance_np(np.cumprod(1 - linear_betas(1000))[diffusion.timestep_map])
    x = paddle.zeros([1, 2, 1, 1, 1])
    for t in (0, 4):
        _, log_var, _ = diffusion.p_mean_variance(paddle.zeros([1, 2, 1, 1, 1]), x, paddle.to_tensor([t]))
        expected = np.log(variance[max(t, 1)]) if sigma_small else np.log(variance[1] if t == 0 else betas[t])
        np.testing.assert_allclose(log_var.numpy().ravel(), expected, rtol=1e-6)


def test_respacing_is_given_once():
    with pytest.raises(ValueError, match="give num_sampling_steps or timestep_respacing, not both"):
        IDDPM(num_sampling_steps=10, timestep_respacing="10")
    assert IDDPM(timestep_respacing="ddim10").timestep_map == list(range(0, 1000, 100))


def test_config_rebuilds_the_scheduler_and_steps_can_be_changed():
    given = dict(timestep_respacing="25", learn_sigma=True, sigma_small=True, diffusion_steps=500, cfg_scale=3.0,
                 cfg_channel=2)
    diffusion = IDDPM(**given)
    assert diffusion.config == given and diffusion.num_inference_steps == 25
    assert IDDPM(**diffusion.config).config == given
    fewer = diffusion.with_sampling_steps(10)
    assert fewer.config == {**given, "timestep_respacing": "10"} and fewer.num_inference_steps == 10
    np.testing.assert_array_equal(fewer.timestep_map, IDDPM(num_sampling_steps=10, diffusion_steps=500).timestep_map)


def test_step_callback_counts_steps_from_the_first(text_encoder, make_fake_model, size_args):
    diffusion = IDDPM(num_sampling_steps=3, cfg_scale=1.0)
    seen = []

    def callback(step_index, t, z):
        seen.append((step_index, int(t[0])))
        return z

    diffusion.sample(make_fake_model(), text_encoder, paddle.ones([1, 2, 3, 1, 1]), ["abc"], size_args(1),
                     progress=False, step_callback=callback)
    assert seen == [(0, 2), (1, 1), (2, 0)]
