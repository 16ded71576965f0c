"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) for models trained with IDDPM: multistep, second order, on
the data prediction, with the per-frame masks of `mask_strategy`.

The 1000-step linear-beta process of IDDPM is read as a continuous one: log alpha_t (alpha_t^2 = alphabar_t)
is interpolated linearly between integer timesteps, sigma_t = sqrt(1 - alpha_t^2), and lambda_t =
log(alpha_t / sigma_t) is the half log-SNR. The model's noise prediction eps (its first C output channels; a
learned-variance half is ignored) gives the data prediction D = (x_t - sigma_t eps) / alpha_t, and the
probability-flow ODE from t to t' < t is solved in lambda with D approximated as constant (first order, which
is DDIM) or linear in lambda through the previous step's D (second order, multistep):

    x_t' = (sigma_t' / sigma_t) x_t - alpha_t' (exp(-h) - 1) (D_t + (D_t - D_prev) / (2 r)),
    h = lambda_t' - lambda_t,  r = (lambda_t - lambda_prev) / h.

Sampling evaluates the model at N timesteps from T - 1 (pure noise) down to 0 and ends with the data
prediction at t = 0 (a first-order step to sigma = 0), as IDDPM's last step returns its prediction of x_0.
"""

import numpy as np
import paddle
from tqdm import tqdm

from schedulers.guidance import doubled, encode_prompts, guided_prediction
from schedulers.iddpm import linear_betas
from schedulers.masking import FrameConditioning, frame_axis

TIMESTEP_SPACINGS = ("logSNR", "time_uniform")
SOLVER_ORDERS = (1, 2)


class DPMSolver:
    """DPM-Solver++ sampling of an eps-predicting model trained on IDDPM's linear-beta process.

    Args:
        num_sampling_steps: model evaluations per video (one per step, each on the doubled CFG batch).
        diffusion_steps: length of the training process (its linear betas are scaled as IDDPM scales them).
        cfg_scale, cfg_channel: classifier-free guidance on the first `cfg_channel` eps channels (default:
            all of them), as IDDPM guides them.
        solver_order: 2 (multistep DPM-Solver++(2M), the default) or 1 (DDIM, for comparison).
        timestep_spacing: "logSNR" (default) spaces the steps evenly in lambda, the step-size schedule the
            DPM-Solver paper proposes (section 3.4); "time_uniform" evenly in t, as Open-Sora v1.1's
            dpm-solver did. On the linear-beta process evenly spaced timesteps leave one long jump in lambda
            (t = 999 / (N - 1) -> 0 covers lambda 2.3 -> 4.6 at N = 20), where the second order loses its
            advantage; evenly spaced lambdas keep every step the same size for the solver.
    """

    def __init__(self, num_sampling_steps=20, diffusion_steps=1000, cfg_scale=4.0, cfg_channel=None, solver_order=2,
                 timestep_spacing="logSNR"):
        if int(num_sampling_steps) != num_sampling_steps or num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be a positive integer, got {num_sampling_steps!r}")
        if solver_order not in SOLVER_ORDERS:
            raise ValueError(f"solver_order {solver_order!r} is not one of {SOLVER_ORDERS}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
        self.num_sampling_steps = int(num_sampling_steps)
        self.diffusion_steps = diffusion_steps
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel
        self.solver_order = solver_order
        self.timestep_spacing = timestep_spacing
        # log alpha_t = log sqrt(alphabar_t) at the integer timesteps, in float64
        self.log_alphas = 0.5 * np.cumsum(np.log(1.0 - linear_betas(diffusion_steps)))

    @property
    def config(self):
        """The constructor arguments that rebuild this scheduler (saved as a pipeline's scheduler_config.json)."""
        return dict(num_sampling_steps=self.num_sampling_steps, diffusion_steps=self.diffusion_steps,
                    cfg_scale=self.cfg_scale, cfg_channel=self.cfg_channel, solver_order=self.solver_order,
                    timestep_spacing=self.timestep_spacing)

    @property
    def num_inference_steps(self):
        return self.num_sampling_steps

    def with_sampling_steps(self, num_sampling_steps):
        """The same scheduler with `num_sampling_steps` steps."""
        return DPMSolver(**{**self.config, "num_sampling_steps": num_sampling_steps})

    # ------------------------------------------------------------------ the continuous noise schedule

    def log_alpha(self, t):
        """log alpha_t for a float timestep t in [0, T - 1], linear between the integer timesteps."""
        return float(np.interp(t, np.arange(self.diffusion_steps), self.log_alphas))

    def alpha_sigma(self, t):
        log_alpha = self.log_alpha(t)
        return float(np.exp(log_alpha)), float(np.sqrt(-np.expm1(2.0 * log_alpha)))

    def log_snr(self, t):
        """lambda_t = log(alpha_t / sigma_t), the half log-SNR; it decreases as t grows."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * float(np.log(-np.expm1(2.0 * log_alpha)))

    def timestep_at_log_snr(self, log_snr):
        """The timestep whose lambda is `log_snr` (the inverse of `log_snr`)."""
        log_alpha = -0.5 * np.log1p(np.exp(-2.0 * log_snr))  # alpha^2 = sigmoid(2 lambda)
        # log alpha decreases with t; np.interp wants increasing abscissae
        return float(np.interp(log_alpha, self.log_alphas[::-1], np.arange(self.diffusion_steps)[::-1]))

    def sampling_timesteps(self):
        """The N timesteps the model is evaluated at, as Python floats from T - 1 down to 0."""
        first, steps = float(self.diffusion_steps - 1), self.num_sampling_steps
        if steps == 1:
            return [first]
        if self.timestep_spacing == "time_uniform":
            return [first * (1.0 - i / (steps - 1)) for i in range(steps)]
        lambdas = np.linspace(self.log_snr(first), self.log_snr(0.0), steps)
        # the ends exactly, whatever the round trip through lambda does to them
        return [first] + [self.timestep_at_log_snr(value) for value in lambdas[1:-1]] + [0.0]

    # ------------------------------------------------------------------ one solver step

    def add_noise(self, x_start, noise, t):
        """x_t = alpha_t x_start + sigma_t noise at the float timestep t."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha * x_start + sigma * noise

    def data_prediction(self, x, eps, t):
        """D = (x_t - sigma_t eps) / alpha_t, the prediction of x_0 from the noise prediction at t."""
        alpha, sigma = self.alpha_sigma(t)
        return (x - sigma * eps) / alpha

    def step(self, x, t, t_next, denoised, previous=None):
        """x at t_next from x at t and its data prediction `denoised`.

        `previous` = (t_prev, denoised_prev) from the step before makes it second order; without it the step
        is first order (DDIM). t_next None means sigma = 0: the result is `denoised` itself.
        """
        if t_next is None:
            return denoised
        alpha_next, sigma_next = self.alpha_sigma(t_next)
        _, sigma = self.alpha_sigma(t)
        h = self.log_snr(t_next) - self.log_snr(t)
        factor = -alpha_next * float(np.expm1(-h))
        if previous is not None:
            t_prev, denoised_prev = previous
            r = (self.log_snr(t) - self.log_snr(t_prev)) / h
            denoised = denoised + (denoised - denoised_prev) * (0.5 / r)
        return (sigma_next / sigma) * x + factor * denoised

    # ------------------------------------------------------------------ sampling

    @paddle.no_grad()
    def sample(self, model, text_encoder, z, prompts, additional_args, mask=None, progress=True, cfg_scale=None,
               step_callback=None):
        """Generate latents from noise z [B, C, T, H, W]; `mask` [B, T] conditions frames (see masking.py).
        `step_callback(step_index, t, z)`, if given, sees the latents after each step and returns them.

        Frame masks: hard conditions keep their value; a frame with 0 < m < 1 is held until the first step
        whose timestep is at most m * T, noised there to that step's level and generated from it. A frame that
        joins starts its own history, so its first step is first order. The model is told a frame is generated
        from that step on (x_mask = the frames whose update the step keeps). Open-Sora v1.1's IDDPM tells it so
        only from the next step (`strict_model_mask`), which differs only when m * T is a grid timestep; one of
        IDDPM's 100 small steps made from the output for a frame the model takes for clean costs little, one
        of these long steps would land off the data.
        """
        cfg_scale = self.cfg_scale if cfg_scale is None else cfg_scale
        batch, channels = z.shape[:2]
        text_args = encode_prompts(model, text_encoder, prompts)
        size_args = doubled(additional_args)
        guided_channels = self.cfg_channel if self.cfg_channel is not None else channels
        conditioning = None
        if mask is not None:
            conditioning = FrameConditioning(mask, self.diffusion_steps, strict_model_mask=False)
        timesteps = self.sampling_timesteps()
        previous = None  # (timestep, data prediction) of the step before, for the second order
        was_active = None

        for i in tqdm(range(len(timesteps)), disable=not progress, desc="dpm-solver", leave=False):
            t_value = timesteps[i]
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
            t = paddle.full([batch], t_value, dtype="float32")
            x_mask = active = None
            if conditioning is not None:
                z, x_mask, active = conditioning.begin_step(
                    z, t, lambda x, _, level=t_value: self.add_noise(x, paddle.randn(x.shape, dtype=x.dtype), level)
                )
            eps = guided_prediction(model, z, t, text_args, size_args, x_mask, cfg_scale, guided_channels)[:, :channels]
            denoised = self.data_prediction(z, eps, t_value)
            history = previous if self.solver_order == 2 and t_next is not None else None
            if history is not None and active is not None:
                # frames noised at this step have no earlier prediction of their own: first order for them
                joined = frame_axis(active & ~was_active)
                history = (history[0], paddle.where(joined, denoised, history[1]))
            z_next = self.step(z, t_value, t_next, denoised, history)
            z = z_next if conditioning is None else conditioning.end_step(z, z_next, active)
            previous, was_active = (t_value, denoised), active
            if step_callback is not None:
                z = step_callback(i, t, z)
        return z
