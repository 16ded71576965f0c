"""IDDPM: the diffusion process, its respacing, sampling and training loss.

Coefficient tables are computed once in float64 numpy. Sampling uses the same timestep for the whole batch,
so per-step coefficients are Python floats; training draws a timestep per sample and gathers from tensors.
"""

import math

import numpy as np
import paddle
from tqdm import tqdm

from schedulers.guidance import doubled, encode_prompts, guided_prediction
from schedulers.masking import FrameConditioning, condition_training_input, mean_flat


def linear_betas(num_timesteps):
    """The linear schedule of DDPM, scaled so any number of steps spans the same noise levels."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, section_counts):
    """Timesteps of the base process kept by respacing, as a sorted list.

    `section_counts` is "N" or "N1,N2,..." (that many evenly spaced steps from each equal section of the
    process) or "ddimN" (a fixed integer stride giving exactly N steps, as in DDIM).
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {desired} steps from {num_timesteps} with an integer stride")
    if isinstance(section_counts, str):
        section_counts = [int(count) for count in section_counts.split(",")]
    base_size, extra = divmod(num_timesteps, len(section_counts))
    steps, start = [], 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * k) for k in range(count)]
        start += size
    return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + paddle.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * paddle.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + paddle.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian (per element)."""
    centered = x - means
    inv_stdv = paddle.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = paddle.log(cdf_plus.clip(min=1e-12))
    log_one_minus_cdf_min = paddle.log((1.0 - cdf_min).clip(min=1e-12))
    log_cdf_delta = paddle.log((cdf_plus - cdf_min).clip(min=1e-12))
    return paddle.where(x < -0.999, log_cdf_plus, paddle.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class IDDPM:
    """Improved DDPM with the noise prediction (eps) and learned-range variance of Open-Sora v1.1.

    Args:
        num_sampling_steps / timestep_respacing: respacing of the 1000-step process for sampling ("100",
            "ddim50", "10,20,30"); training always uses the full process unless respacing is given.
        learn_sigma: the model outputs 2*C channels (eps, variance interpolation); otherwise the variance is
            fixed (`sigma_small` selects the posterior variance, else betas).
        cfg_scale, cfg_channel: classifier-free guidance on the first `cfg_channel` output channels (default:
            the eps half, i.e. all latent channels).
    """

    def __init__(
        self,
        num_sampling_steps=None,
        timestep_respacing=None,
        learn_sigma=True,
        sigma_small=False,
        diffusion_steps=1000,
        cfg_scale=4.0,
        cfg_channel=None,
    ):
        if num_sampling_steps is not None:
            if timestep_respacing:
                raise ValueError("give num_sampling_steps or timestep_respacing, not both")
            timestep_respacing = str(num_sampling_steps)
        self.timestep_respacing = timestep_respacing or str(diffusion_steps)
        self.diffusion_steps = diffusion_steps
        self.timestep_map = space_timesteps(diffusion_steps, self.timestep_respacing)
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.cfg_scale = cfg_scale
        self.cfg_channel = cfg_channel

        # Respacing keeps the cumulative alphas of the retained timesteps and derives new betas from them.
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas(diffusion_steps))
        alphas_cumprod = base_alphas_cumprod[self.timestep_map]
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
        self.num_timesteps = len(betas)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        self._tensors = {}

    # ------------------------------------------------------------------ coefficient lookup

    def _extract(self, name, t, ndim):
        """Table `name` at timesteps t: a float (int t) or a [B, 1, ...] tensor (tensor t)."""
        table = getattr(self, name)
        if isinstance(t, int):
            return float(table[t])
        if name not in self._tensors:
            self._tensors[name] = paddle.to_tensor(table, dtype="float32")
        return paddle.gather(self._tensors[name], t.astype("int64")).reshape([-1] + [1] * (ndim - 1))

    def model_timesteps(self, t):
        """Respaced indices -> timesteps of the 1000-step process that the model was trained on."""
        if "timestep_map" not in self._tensors:
            self._tensors["timestep_map"] = paddle.to_tensor(self.timestep_map, dtype="float32")
        return paddle.gather(self._tensors["timestep_map"], t.astype("int64"))

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x_start, t, noise):
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.ndim) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.ndim) * x_t
        )
        return mean, self._extract("posterior_log_variance_clipped", t, x_t.ndim)

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(self, model_output, x, t):
        """Mean and log-variance of p(x_{t-1} | x_t) from the model output at x_t, and the predicted x_0."""
        channels = x.shape[1]
        eps = model_output[:, :channels]
        if self.learn_sigma:
            # The second half in [-1, 1] interpolates the log-variance between the posterior's and beta's.
            fraction = (model_output[:, channels:] + 1) / 2
            min_log = self._extract("posterior_log_variance_clipped", t, x.ndim)
            max_log = self._extract("log_betas", t, x.ndim)
            log_variance = fraction * max_log + (1 - fraction) * min_log
        elif self.sigma_small:
            log_variance = self._extract("posterior_log_variance_clipped", t, x.ndim)
        else:
            log_variance = self._extract("log_betas_large", t, x.ndim)
        pred_xstart = (
            self._extract("sqrt_recip_alphas_cumprod", t, x.ndim) * x
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x.ndim) * eps
        )
        mean, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return mean, log_variance, pred_xstart

    @property
    def log_betas(self):
        return np.log(self.betas)

    @property
    def log_betas_large(self):
        return np.log(np.append(self.posterior_variance[1], self.betas[1:]))

    @property
    def config(self):
        """The constructor arguments that rebuild this scheduler (saved as a pipeline's scheduler_config.json)."""
        return dict(timestep_respacing=self.timestep_respacing, learn_sigma=self.learn_sigma, sigma_small=self.sigma_small,
                    diffusion_steps=self.diffusion_steps, cfg_scale=self.cfg_scale, cfg_channel=self.cfg_channel)

    @property
    def num_inference_steps(self):
        return self.num_timesteps

    def with_sampling_steps(self, num_sampling_steps):
        """The same scheduler respaced to `num_sampling_steps` steps."""
        return IDDPM(**{**self.config, "timestep_respacing": str(num_sampling_steps)})

    @paddle.no_grad()
    def sample(self, model, text_encoder, z, prompts, additional_args, mask=None, progress=True, cfg_scale=None,
               step_callback=None):
        """Ancestral sampling from noise z [B, C, T, H, W]; `mask` [B, T] conditions frames (masking.py).
        `step_callback(step_index, t, z)`, if given, sees the latents after each step and returns them."""
        cfg_scale = self.cfg_scale if cfg_scale is None else cfg_scale
        batch, channels = z.shape[:2]
        text_args = encode_prompts(model, text_encoder, prompts)
        size_args = doubled(additional_args)
        conditioning = None
        if mask is not None:
            conditioning = FrameConditioning(mask, self.num_timesteps, strict_model_mask=True, integer_threshold=True)
        guided_channels = self.cfg_channel if self.cfg_channel is not None else channels

        for index in tqdm(reversed(range(self.num_timesteps)), total=self.num_timesteps, disable=not progress, desc="iddpm", leave=False):
            t = paddle.full([batch], index, dtype="int64")
            x_mask = active = None
            if conditioning is not None:
                z, x_mask, active = conditioning.begin_step(
                    z, t, lambda x, t: self.q_sample(x, index, paddle.randn(x.shape, dtype=x.dtype))
                )
            output = guided_prediction(
                model, z, self.model_timesteps(t), text_args, size_args, x_mask, cfg_scale, guided_channels
            )
            mean, log_variance, _ = self.p_mean_variance(output, z, index)
            z_next = mean
            if index > 0:
                z_next = mean + paddle.exp(0.5 * log_variance) * paddle.randn(z.shape, dtype=z.dtype)
            z = z_next if conditioning is None else conditioning.end_step(z, z_next, active)
            if step_callback is not None:
                z = step_callback(self.num_timesteps - 1 - index, t, z)
        return z

    # ------------------------------------------------------------------ training

    def training_losses(self, model, x_start, model_kwargs, mask=None, weights=None, t=None, noise=None):
        """Per-sample loss [B]: MSE on eps plus, with a learned variance, the variational bound (which does
        not train the mean). `mask` [B, T] bool: False frames are conditions, given at t = 0 and excluded."""
        batch, channels = x_start.shape[:2]
        if t is None:
            t = paddle.randint(0, self.num_timesteps, [batch])
        t = t.astype("int64")
        noise = paddle.randn(x_start.shape, dtype=x_start.dtype) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        if mask is not None:  # conditioning frames are given at t = 0, as in the original
            x_t, model_kwargs = condition_training_input(x_t, self.q_sample(x_start, paddle.zeros_like(t), noise), mask, model_kwargs)
            mask = mask.astype("bool")
        output = model(x_t, self.model_timesteps(t), **model_kwargs)
        eps = output[:, :channels]
        squared_error = (noise - eps) ** 2
        if weights is not None:
            squared_error = squared_error * paddle.gather(paddle.to_tensor(np.asarray(weights), dtype="float32"), t).reshape([-1, 1, 1, 1, 1])
        terms = {"mse": mean_flat(squared_error, mask)}
        terms["loss"] = terms["mse"]
        if self.learn_sigma:
            frozen = paddle.concat([eps.detach(), output[:, channels:]], axis=1)
            terms["vb"] = self.variational_bound(frozen, x_start, x_t, t, mask)
            terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    def variational_bound(self, model_output, x_start, x_t, t, mask=None):
        """The VLB term in bits per dimension: KL to the true posterior, or the decoder NLL at t = 0."""
        true_mean, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance), mask) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)
        decoder_nll = mean_flat(decoder_nll, mask) / math.log(2.0)
        return paddle.where(t == 0, decoder_nll, kl)
