"""DPM-Solver++ against independent computations: the exact probability-flow ODE solution for Gaussian data,
the update formula by hand, a numpy re-implementation of the masked sampler, guidance, settings, and the tiny
STDiT2 through the pipeline."""

import numpy as np
import paddle
import pytest

from schedulers.dpm_solver import DPMSolver

# The process the sampler must read, written down here independently: IDDPM's 1000 linear betas, alpha_t^2 the
# cumulative product of 1 - beta, log alpha linear between integer timesteps.
BASE_ALPHABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def alpha_sigma(t):
    alpha = np.exp(np.interp(t, np.arange(1000), 0.5 * np.log(BASE_ALPHABAR)))
    return alpha, np.sqrt(1.0 - alpha**2)


def half_log_snr(t):
    alpha, sigma = alpha_sigma(t)
    return np.log(alpha / sigma)


class GaussianDataModel(paddle.nn.Layer):
    """The exact noise prediction when every latent element is independent N(mu, s^2) data:
    E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2). A second (variance) half of junk follows."""

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        alpha, sigma = alpha_sigma(timestep.numpy().astype("float64"))
        alpha, sigma = alpha.reshape([-1, 1, 1, 1, 1]), sigma.reshape([-1, 1, 1, 1, 1])
        x64 = x.numpy().astype("float64")
        eps = sigma * (x64 - alpha * self.mu) / (alpha**2 * self.s**2 + sigma**2)
        return paddle.concat([paddle.to_tensor(eps.astype("float32")), x + 100.0], axis=1)


def gaussian_case():
    rng = np.random.default_rng(0)
    mu = rng.uniform(-2, 2, [1, 3, 1, 2, 2])
    s = rng.uniform(0.2, 1.5, [1, 3, 1, 2, 2])
    z = rng.standard_normal([2, 3, 2, 2, 2])
    # the probability-flow ODE keeps (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant
    alpha, sigma = alpha_sigma(999.0)
    exact = mu + s * (z - alpha * mu) / np.sqrt(alpha**2 * s**2 + sigma**2)
    return GaussianDataModel(mu, s), z, exact


def solve(scheduler, model, z, text_encoder, size_args, **kwargs):
    out = scheduler.sample(model, text_encoder, paddle.to_tensor(z, dtype="float32"), ["p"] * z.shape[0],
                           size_args(z.shape[0]), progress=False, **kwargs)
    return out.numpy().astype("float64")


def test_second_order_lands_on_the_exact_ode_solution_and_converges_as_the_square_of_the_step(text_encoder, size_args):
    model, z, exact = gaussian_case()

    def error(solver):  # in units of each element's data standard deviation
        return (np.abs(solve(solver, model, z, text_encoder, size_args) - exact) / model.s).max()

    errors = {(order, steps): error(DPMSolver(steps, solver_order=order, cfg_scale=7.0))
              for order in (1, 2) for steps in (20, 40, 80)}
    assert errors[2, 20] < 0.04 and errors[2, 80] < 0.002
    assert errors[1, 20] > 5 * errors[2, 20]  # DDIM, same number of model calls
    # halving the step divides the error by about 4 (second order) and 2 (first order)
    assert 3.5 < errors[2, 20] / errors[2, 40] < 4.5 and 3.5 < errors[2, 40] / errors[2, 80] < 4.5
    assert 1.8 < errors[1, 20] / errors[1, 40] < 2.2 and 1.8 < errors[1, 40] / errors[1, 80] < 2.2


def test_evenly_spaced_timesteps_reach_the_same_solution(text_encoder, size_args):
    model, z, exact = gaussian_case()
    solutions = [solve(DPMSolver(steps, timestep_spacing="time_uniform"), model, z, text_encoder, size_args)
                 for steps in (200, 800)]
    errors = [(np.abs(solution - exact) / model.s).max() for solution in solutions]
    assert errors[0] < 0.02 and errors[1] < 0.001


@pytest.mark.parametrize("steps", [2, 7, 25])
def test_timestep_grids(steps):
    grid = np.array(DPMSolver(steps).sampling_timesteps())
    assert len(grid) == steps and grid[0] == 999.0 and grid[-1] == 0.0
    lambdas = half_log_snr(grid)
    np.testing.assert_allclose(np.diff(lambdas), (half_log_snr(0.0) - half_log_snr(999.0)) / (steps - 1), rtol=1e-6)
    uniform = DPMSolver(steps, timestep_spacing="time_uniform").sampling_timesteps()
    np.testing.assert_allclose(uniform, np.linspace(999.0, 0.0, steps), rtol=1e-12, atol=1e-9)
    assert DPMSolver(1).sampling_timesteps() == [999.0] == DPMSolver(1, timestep_spacing="time_uniform").sampling_timesteps()


def test_the_continuous_schedule_matches_the_discrete_process_at_integer_timesteps():
    solver = DPMSolver()
    for t in (0, 1, 250, 999):
        alpha, sigma = solver.alpha_sigma(float(t))
        assert alpha == pytest.approx(np.sqrt(BASE_ALPHABAR[t]), rel=1e-12)
        assert sigma == pytest.approx(np.sqrt(1 - BASE_ALPHABAR[t]), rel=1e-12)
    for t in (0.0, 0.4, 17.25, 998.5):
        assert solver.timestep_at_log_snr(solver.log_snr(t)) == pytest.approx(t, abs=1e-6)
    assert solver.log_snr(0.0) == pytest.approx(np.log(np.sqrt(BASE_ALPHABAR[0] / (1 - BASE_ALPHABAR[0]))), rel=1e-12)
    # a diffusion of 500 steps has betas from 2e-4 to 0.04 (IDDPM scales them so)
    alphabar = np.cumprod(1.0 - np.linspace(2e-4, 0.04, 500))
    assert DPMSolver(diffusion_steps=500).alpha_sigma(249.0)[0] == pytest.approx(np.sqrt(alphabar[249]), rel=1e-12)


class AffineModel(paddle.nn.Layer):
    """eps = 0.3 x + 0.1 (channel + 1), and a variance half; records its timesteps."""

    def __init__(self):
        super().__init__()
        self.timesteps = []

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        self.timesteps.append(timestep.numpy().copy())
        channel = paddle.arange(x.shape[1], dtype=x.dtype).reshape([1, -1, 1, 1, 1])
        return paddle.concat([0.3 * x + 0.1 * (channel + 1), -x], axis=1)


def affine_eps(x):
    return 0.3 * x + 0.1 * (np.arange(x.shape[1]).reshape([1, -1, 1, 1, 1]) + 1)


@pytest.mark.parametrize("order", [1, 2])
def test_three_steps_by_hand(text_encoder, size_args, order):
    solver = DPMSolver(3, solver_order=order, cfg_scale=1.0)
    t = solver.sampling_timesteps()
    z = np.random.default_rng(3).standard_normal([1, 2, 3, 2, 2])
    model = AffineModel()
    out = solve(solver, model, z, text_encoder, size_args)
    assert [float(step[0]) for step in model.timesteps] == pytest.approx(t, rel=1e-7)
    assert all(step.shape == (2,) for step in model.timesteps)  # the CFG-doubled batch

    (a0, s0), (a1, s1), (a2, s2) = (alpha_sigma(value) for value in t)
    l0, l1, l2 = (half_log_snr(value) for value in t)
    d0 = (z - s0 * affine_eps(z)) / a0
    x1 = s1 / s0 * z + a1 * (1 - np.exp(l0 - l1)) * d0  # DDIM from the first prediction
    d1 = (x1 - s1 * affine_eps(x1)) / a1
    if order == 2:  # D extrapolated linearly in lambda through the previous prediction, to the middle of the step
        slope = (d1 - d0) / (l1 - l0)
        d1 = d1 + slope * (l2 - l1) / 2
    x2 = s2 / s1 * x1 + a2 * (1 - np.exp(l1 - l2)) * d1
    np.testing.assert_allclose(out, (x2 - s2 * affine_eps(x2)) / a2, rtol=1e-5, atol=1e-5)


def test_step_formula_and_its_end_at_sigma_zero():
    solver = DPMSolver()
    x, d, d_prev = (paddle.to_tensor(np.random.default_rng(k).standard_normal([2, 3]), dtype="float32") for k in range(3))
    t_prev, t, t_next = 700.0, 400.0, 150.5
    (_, s), (a_next, s_next) = alpha_sigma(t), alpha_sigma(t_next)
    h, h_prev = half_log_snr(t_next) - half_log_snr(t), half_log_snr(t) - half_log_snr(t_prev)
    first = s_next / s * x.numpy() + a_next * (1 - np.exp(-h)) * d.numpy()
    np.testing.assert_allclose(solver.step(x, t, t_next, d).numpy(), first, rtol=1e-5, atol=1e-6)
    second = first + a_next * (1 - np.exp(-h)) * h / (2 * h_prev) * (d.numpy() - d_prev.numpy())
    np.testing.assert_allclose(solver.step(x, t, t_next, d, (t_prev, d_prev)).numpy(), second, rtol=1e-5, atol=1e-6)
    assert solver.step(x, t, None, d, (t_prev, d_prev)) is d


class MaskReadingModel(paddle.nn.Layer):
    """eps = 0.5 x + caption offset on frames the model is told are generated, plus `poison` on frames told to
    be conditions: a frame moved while the model was told it is a condition goes astray. Records x_mask."""

    def __init__(self, poison=100.0):
        super().__init__()
        self.poison = poison
        self.x_masks = []

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        self.x_masks.append(None if x_mask is None else x_mask.numpy().copy())
        offset = y.mean(axis=[1, 2, 3]).reshape([-1, 1, 1, 1, 1]) * 0.01
        out = x * 0.5 + offset
        if x_mask is not None:
            out = out + self.poison * (~x_mask).astype(x.dtype)[:, None, :, None, None]
        return paddle.concat([out, out], axis=1)


def numpy_dpm_solver(x, grid, eps, order=2):
    """DPM-Solver++ in numpy for a frame that joins at grid[0] with value x; `eps(x)` is the guided noise
    prediction. First order first, then multistep second order in the data prediction; ends with D at sigma 0."""
    previous = None
    for i, t in enumerate(grid):
        alpha, sigma = alpha_sigma(t)
        d = (x - sigma * eps(x)) / alpha
        if i == len(grid) - 1:
            return d
        alpha_next, sigma_next = alpha_sigma(grid[i + 1])
        h = half_log_snr(grid[i + 1]) - half_log_snr(t)
        d_used = d
        if previous is not None and order == 2:
            r = (half_log_snr(t) - half_log_snr(previous[0])) / h
            d_used = d + (d - previous[1]) / (2 * r)
        x = sigma_next / sigma * x - alpha_next * np.expm1(-h) * d_used
        previous = (t, d)


def test_frame_masks_hold_renoise_once_and_restart_the_history(text_encoder, size_args, monkeypatch):
    """Frames: hard condition, generated, edited 0.5 (joins at the first t <= 500), edited 0.02 (t <= 20)."""
    draws = []
    randn = paddle.randn

    def recording_randn(*args, **kwargs):
        draws.append(randn(*args, **kwargs))
        return draws[-1]

    monkeypatch.setattr(paddle, "randn", recording_randn)
    solver = DPMSolver(8, cfg_scale=3.0)
    grid = solver.sampling_timesteps()
    mask = [0.0, 1.0, 0.5, 0.02]
    z = np.random.default_rng(5).standard_normal([1, 2, 4, 2, 2]).astype("float32")
    model = MaskReadingModel()
    seen = []

    def callback(step, t, latents):
        seen.append(latents.numpy().copy())
        return latents

    out = solve(solver, model, z, text_encoder, size_args, mask=paddle.to_tensor([mask]), step_callback=callback)

    # the model is told a frame is generated from the step that noises it on, in both halves of the CFG batch
    expected_x_mask = [[False, True, 500 >= t, 20 >= t] for t in grid]
    assert [x_mask[0].tolist() for x_mask in model.x_masks] == expected_x_mask
    assert all((x_mask[0] == x_mask[1]).all() for x_mask in model.x_masks)
    joins = [expected_x_mask.index(row) for row in ([False, True, True, False], [False, True, True, True])]
    assert 0 < joins[0] < joins[1] < len(grid) - 1  # the case covers frames joining mid-way

    np.testing.assert_array_equal(out[:, :, 0], z[:, :, 0])  # the hard condition is the reference, exactly
    for step, latents in enumerate(seen):  # edited frames are held, exactly, until they join
        np.testing.assert_array_equal(latents[:, :, 2] == z[:, :, 2], np.full_like(z[:, :, 2], step < joins[0], bool))
        np.testing.assert_array_equal(latents[:, :, 3] == z[:, :, 3], np.full_like(z[:, :, 3], step < joins[1], bool))

    def eps(x):
        return 0.5 * x + 3.0 * 0.01  # uncond + 3 (cond - uncond); the null caption's offset is 0

    assert len(draws) == len(grid) and all(draw.shape == [1, 2, 4, 2, 2] for draw in draws)  # a draw per step
    expected = {1: numpy_dpm_solver(z[:, :, 1], grid, eps)}
    for frame, join in ((2, joins[0]), (3, joins[1])):
        alpha, sigma = alpha_sigma(grid[join])
        noised = alpha * z[:, :, frame] + sigma * draws[join].numpy()[:, :, frame]
        expected[frame] = numpy_dpm_solver(noised, grid[join:], eps)
    for frame, value in expected.items():
        np.testing.assert_allclose(out[:, :, frame], value, rtol=1e-4, atol=1e-4)


def test_a_frame_whose_threshold_is_a_grid_timestep_joins_there_as_a_generated_frame(text_encoder, size_args):
    """m T = t exactly: the frame is noised at t and the model is told so at t (Open-Sora v1.1's IDDPM would still
    call it a condition at that step, and the poison of a told condition would then move it)."""
    solver = DPMSolver(10, timestep_spacing="time_uniform", cfg_scale=1.0)
    grid = solver.sampling_timesteps()
    assert grid[5] == 444.0 and float((paddle.to_tensor([0.444]) * 1000)[0]) == 444.0
    model = MaskReadingModel(poison=1e4)
    out = solve(solver, model, np.zeros([1, 1, 2, 1, 1]), text_encoder, size_args, mask=paddle.to_tensor([[1.0, 0.444]]))
    assert [bool(x_mask[0, 1]) for x_mask in model.x_masks] == [False] * 5 + [True] * 5
    assert np.abs(out).max() < 5


def test_generated_frames_do_not_depend_on_the_masks_of_others(text_encoder, size_args):
    solver = DPMSolver(5, cfg_scale=2.0)
    z = np.random.default_rng(6).standard_normal([2, 2, 3, 1, 2]).astype("float32")
    mask = paddle.to_tensor([[0.0, 1.0, 0.3], [1.0, 0.6, 0.0]])
    masked = solve(solver, MaskReadingModel(), z, text_encoder, size_args, mask=mask)
    plain = solve(solver, MaskReadingModel(poison=0.0), z, text_encoder, size_args)
    np.testing.assert_allclose(masked[0, :, 1], plain[0, :, 1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(masked[1, :, 0], plain[1, :, 0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(masked[0, :, 0], z[0, :, 0].astype("float32"))
    np.testing.assert_array_equal(masked[1, :, 2], z[1, :, 2].astype("float32"))
    # an edit ratio of 1 is a generated frame; plain sampling without a mask tells the model nothing
    np.testing.assert_allclose(
        solve(solver, MaskReadingModel(), z, text_encoder, size_args, mask=paddle.ones([2, 3])), plain, rtol=1e-6, atol=1e-6
    )
    model = MaskReadingModel()
    solve(solver, model, z, text_encoder, size_args)
    assert model.x_masks == [None] * 5


def test_masked_sampling_is_deterministic_under_a_seed(text_encoder, size_args):
    def run():
        paddle.seed(9)
        return solve(DPMSolver(4), MaskReadingModel(), np.ones([1, 2, 3, 1, 1]), text_encoder, size_args,
                     mask=paddle.to_tensor([[0.0, 0.7, 1.0]]))

    first = run()
    np.testing.assert_array_equal(first, run())
    assert np.isfinite(first).all() and not np.allclose(first[:, :, 1], 1.0)


class CaptionModel(paddle.nn.Layer):
    """eps = the caption's mean (the fake encoder's prompt length; 0 for the null caption)."""

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        eps = paddle.zeros_like(x) + y.mean(axis=[1, 2, 3]).reshape([-1, 1, 1, 1, 1])
        return paddle.concat([eps, paddle.full_like(x, 7.0)], axis=1)


@pytest.mark.parametrize("cfg_channel, guided", [(1, [10.0, 2.0]), (None, [10.0, 10.0])])
def test_guidance_covers_the_first_cfg_channels(text_encoder, size_args, cfg_channel, guided):
    solver = DPMSolver(2, cfg_scale=1.0, cfg_channel=cfg_channel)
    z = np.random.default_rng(7).standard_normal([1, 2, 3, 2, 2])
    out = solver.sample(CaptionModel(), text_encoder, paddle.to_tensor(z, dtype="float32"), ["ab"], size_args(1),
                        progress=False, cfg_scale=5.0).numpy()
    # uncond + 5 (cond - uncond) = 10 on the guided channels, the conditional 2 on the others
    eps = np.array(guided).reshape([1, 2, 1, 1, 1])
    (a0, s0), (a1, s1) = alpha_sigma(999.0), alpha_sigma(0.0)
    x1 = s1 / s0 * z + a1 * (1 - np.exp(half_log_snr(999.0) - half_log_snr(0.0))) * (z - s0 * eps) / a0
    np.testing.assert_allclose(out, (x1 - s1 * eps) / a1, rtol=1e-5, atol=1e-5)
    # the scheduler's own scale when the call gives none
    default = DPMSolver(2, cfg_scale=5.0, cfg_channel=cfg_channel).sample(
        CaptionModel(), text_encoder, paddle.to_tensor(z, dtype="float32"), ["ab"], size_args(1), progress=False).numpy()
    np.testing.assert_allclose(default, out, rtol=1e-6)


class CaptionEncodingModel(CaptionModel):
    """Precomputes its caption conditioning: `forward` must get what `encode_caption` returned."""

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        assert mask is None and isinstance(y, dict), "the sampler must pass the encoded caption, not the raw one"
        return super().forward(x, timestep, y=y["y"])

    def encode_caption(self, y, mask):
        assert mask.shape == [1, 3]  # the prompt's mask, once for the doubled batch
        return {"y": y * 2}


def test_models_with_encode_caption_get_their_encoded_captions(text_encoder, size_args):
    z = paddle.to_tensor(np.random.default_rng(8).standard_normal([1, 2, 3, 1, 1]), dtype="float32")
    solver = DPMSolver(3, cfg_scale=3.0)
    encoded = solver.sample(CaptionEncodingModel(), text_encoder, z, ["abc"], size_args(1), progress=False).numpy()
    # a caption encoded as twice itself is the caption "abcabc" given raw
    raw = solver.sample(CaptionModel(), text_encoder, z, ["abcabc"], size_args(1), progress=False).numpy()
    np.testing.assert_allclose(encoded, raw, rtol=1e-6)


def test_config_rebuilds_the_scheduler_and_steps_can_be_changed():
    given = dict(num_sampling_steps=13, diffusion_steps=500, cfg_scale=7.0, cfg_channel=3, solver_order=1,
                 timestep_spacing="time_uniform")
    solver = DPMSolver(**given)
    assert solver.config == given and DPMSolver(**solver.config).config == given
    assert solver.num_inference_steps == 13
    fewer = solver.with_sampling_steps(4)
    assert fewer.config == {**given, "num_sampling_steps": 4} and fewer.num_inference_steps == 4
    assert len(fewer.sampling_timesteps()) == 4 and fewer.sampling_timesteps()[0] == 499.0
    assert solver.num_inference_steps == 13  # the original is left as it was
    assert DPMSolver().config == dict(num_sampling_steps=20, diffusion_steps=1000, cfg_scale=4.0, cfg_channel=None,
                                      solver_order=2, timestep_spacing="logSNR")


@pytest.mark.parametrize("bad, message", [
    (dict(num_sampling_steps=0), "num_sampling_steps must be a positive integer"),
    (dict(num_sampling_steps=2.5), "num_sampling_steps must be a positive integer"),
    (dict(solver_order=3), "solver_order 3 is not one of"),
    (dict(timestep_spacing="karras"), "timestep_spacing 'karras' is not one of"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        DPMSolver(**bad)


def test_step_callback_sees_every_step_and_can_replace_the_latents(text_encoder, make_fake_model, size_args):
    solver = DPMSolver(3, cfg_scale=1.0)
    seen = []

    def callback(step_index, t, z):
        seen.append((step_index, t.numpy().tolist()))
        return z * 0 if step_index == 2 else z

    out = solver.sample(make_fake_model(out_factor=2), text_encoder, paddle.ones([2, 2, 3, 1, 1]), ["abc", "d"],
                        size_args(2), progress=False, step_callback=callback)
    assert [step for step, _ in seen] == [0, 1, 2]
    np.testing.assert_allclose([t for _, t in seen], [[value] * 2 for value in solver.sampling_timesteps()], rtol=1e-6)
    assert float(out.abs().max()) == 0.0


def test_progress_bar_is_named_dpm_solver_and_cleared(text_encoder, make_fake_model, size_args, capsys):
    solver = DPMSolver(3, cfg_scale=1.0)
    solver.sample(make_fake_model(), text_encoder, paddle.ones([1, 2, 3, 1, 1]), ["abc"], size_args(1))
    shown = capsys.readouterr().err
    assert shown.startswith("\rdpm-solver:") and "0/3" in shown and shown.rsplit("\r", 2)[-2].strip() == ""
    solver.sample(make_fake_model(), text_encoder, paddle.ones([1, 2, 3, 1, 1]), ["abc"], size_args(1), progress=False)
    assert capsys.readouterr().err == ""


def test_tiny_stdit2_through_the_pipeline(tiny_models):
    from pipelines import Conditions, OpenSoraPipeline
    from schedulers.rflow import RFLOW

    def build(scheduler):
        pipe = OpenSoraPipeline.from_component_paths(
            tiny_models["stdit2"], tiny_models["vae"], tiny_models["text_encoder"], scheduler,
            trained_size=dict(num_frames=4, height=64, width=64, fps=8),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = build(DPMSolver(3, cfg_scale=4.0))
    steps = []
    output = pipe("a red circle moving right", seed=1, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert output.frames.shape == (1, 4, 64, 64, 3) and output.frames.std() > 1 and steps == [0, 1, 2]

    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 10:30] = (250, 40, 40)
    conditions = [Conditions.image_to_video(image), Conditions.edit(np.repeat(image[None], 4, axis=0), edit_ratio=0.5)]
    prompts = ["a red square moving right"] * 2
    latents = pipe(prompts, conditions=conditions, seed=4, output_type="latent").frames.numpy()
    assert np.isfinite(latents).all()
    np.testing.assert_array_equal(latents, pipe(prompts, conditions=conditions, seed=4, output_type="latent").frames.numpy())
    # the reference latents are placed before sampling, so any sampler keeps the same hard-conditioned frame
    placed = build(RFLOW(num_sampling_steps=2))(prompts, conditions=conditions, seed=4, output_type="latent").frames.numpy()
    np.testing.assert_array_equal(latents[0, :, 0], placed[0, :, 0])
    assert np.abs(latents[0, :, 1:] - placed[0, :, 1:]).mean() > 1e-3
