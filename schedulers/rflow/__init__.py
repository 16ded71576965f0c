"""Rectified flow as in Open-Sora v1.2.

Time runs from t = num_timesteps (pure noise) to 0 (data): x_t = (1 - t/T) x_0 + (t/T) noise, and the
model predicts the velocity x_0 - noise. Sampling integrates it with Euler steps.
"""

import numpy as np
import paddle
from tqdm import tqdm

from schedulers.guidance import doubled, encode_prompts, guided_prediction
from schedulers.masking import FrameConditioning, condition_training_input, mean_flat

SAMPLE_METHODS = ("uniform", "logit-normal")


def timestep_transform(t, height, width, latent_frames, num_timesteps, scale=1.0, base_resolution=512 * 512,
                       base_num_frames=1):
    """Shift timesteps towards noise for larger and longer videos (Open-Sora v1.2).

    ratio = sqrt(H*W / base_resolution) * sqrt(latent_frames / base_num_frames) * scale and
    t' = ratio * t / (1 + (ratio - 1) * t) on t in [0, 1]. `latent_frames` is the latents' real frame count
    (what the VAE made of the clip: 16 -> 16 for a 2-D VAE, 51 -> 15 for v1.2's), which v1.2 writes as its
    VAE's `num_frames // 17 * 5`.
    """
    t = t / num_timesteps
    ratio_space = paddle.sqrt(height.astype("float32") * width.astype("float32") / base_resolution)
    ratio_time = (latent_frames / base_num_frames) ** 0.5
    ratio = ratio_space * ratio_time * scale
    return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


class RFLOW:
    def __init__(
        self,
        num_sampling_steps=30,
        num_timesteps=1000,
        cfg_scale=4.0,
        use_discrete_timesteps=False,
        use_timestep_transform=False,
        sample_method="uniform",
        loc=0.0,
        scale=1.0,
        transform_scale=1.0,
    ):
        if sample_method not in SAMPLE_METHODS:
            raise ValueError(f"sample_method {sample_method!r} is not one of {SAMPLE_METHODS}")
        if use_discrete_timesteps and sample_method != "uniform":
            raise ValueError("discrete timesteps are drawn uniformly; use sample_method='uniform'")
        self.num_sampling_steps = num_sampling_steps
        self.num_timesteps = num_timesteps
        self.cfg_scale = cfg_scale
        self.use_discrete_timesteps = use_discrete_timesteps
        self.use_timestep_transform = use_timestep_transform
        self.sample_method = sample_method
        self.loc, self.scale = loc, scale
        self.transform_scale = transform_scale

    @property
    def config(self):
        """The constructor arguments that rebuild this scheduler (saved as a pipeline's scheduler_config.json)."""
        return dict(num_sampling_steps=self.num_sampling_steps, num_timesteps=self.num_timesteps, cfg_scale=self.cfg_scale,
                    use_discrete_timesteps=self.use_discrete_timesteps, use_timestep_transform=self.use_timestep_transform,
                    sample_method=self.sample_method, loc=self.loc, scale=self.scale, transform_scale=self.transform_scale)

    @property
    def num_inference_steps(self):
        return self.num_sampling_steps

    def with_sampling_steps(self, num_sampling_steps):
        return RFLOW(**{**self.config, "num_sampling_steps": num_sampling_steps})

    def add_noise(self, x_start, noise, t):
        """x_t = (1 - t/T) x_start + (t/T) noise, t [B] in [0, T]."""
        noise_level = (t.astype("float32") / self.num_timesteps).reshape([-1] + [1] * (x_start.ndim - 1))
        return (1 - noise_level) * x_start + noise_level * noise

    def transform(self, t, size_args, latent_frames):
        return timestep_transform(t, size_args["height"], size_args["width"], latent_frames, self.num_timesteps,
                                  scale=self.transform_scale)

    def sampling_timesteps(self):
        """The Euler grid T, T(1 - 1/N), ..., T/N as Python floats (before any transform)."""
        timesteps = [(1.0 - i / self.num_sampling_steps) * self.num_timesteps for i in range(self.num_sampling_steps)]
        if self.use_discrete_timesteps:
            timesteps = [float(round(t)) for t in timesteps]
        return timesteps

    @paddle.no_grad()
    def sample(self, model, text_encoder, z, prompts, additional_args, mask=None, progress=True, cfg_scale=None,
               step_callback=None):
        """Generate latents from noise z [B, C, T, H, W]; `mask` [B, T] conditions frames (see masking.py).
        `step_callback(step_index, t, z)`, if given, sees the latents after each step and returns them."""
        cfg_scale = self.cfg_scale if cfg_scale is None else cfg_scale
        batch = z.shape[0]
        text_args = encode_prompts(model, text_encoder, prompts)
        size_args = doubled(additional_args)
        timesteps = [paddle.full([batch], t, dtype="float32") for t in self.sampling_timesteps()]
        if self.use_timestep_transform:
            timesteps = [self.transform(t, additional_args, z.shape[2]) for t in timesteps]
        timesteps.append(paddle.zeros([batch], dtype="float32"))
        conditioning = None if mask is None else FrameConditioning(mask, self.num_timesteps, strict_model_mask=False)

        for i in tqdm(range(self.num_sampling_steps), disable=not progress, desc="rflow", leave=False):
            t = timesteps[i]
            x_mask = active = None
            if conditioning is not None:
                z, x_mask, active = conditioning.begin_step(
                    z, t, lambda x, t: self.add_noise(x, paddle.randn(x.shape, dtype=x.dtype), t)
                )
                z_start = z
            velocity = guided_prediction(
                model, z, t, text_args, size_args, x_mask, cfg_scale, guided_channels=z.shape[1]
            )[:, : z.shape[1]]
            dt = ((t - timesteps[i + 1]) / self.num_timesteps).reshape([-1, 1, 1, 1, 1])
            z = z + velocity * dt
            if conditioning is not None:
                z = conditioning.end_step(z_start, z, active)
            if step_callback is not None:
                z = step_callback(i, t, z)
        return z

    def sample_training_timesteps(self, batch):
        if self.use_discrete_timesteps:
            return paddle.randint(0, self.num_timesteps, [batch]).astype("float32")
        if self.sample_method == "uniform":
            return paddle.rand([batch]) * self.num_timesteps
        return paddle.nn.functional.sigmoid(self.loc + self.scale * paddle.randn([batch])) * self.num_timesteps

    def training_losses(self, model, x_start, model_kwargs, mask=None, weights=None, t=None, noise=None):
        """Velocity-matching loss per sample [B], averaged over generated frames (mask [B, T] bool, True =
        generated; conditioning frames are given clean and excluded from the loss)."""
        batch = x_start.shape[0]
        if t is None:
            t = self.sample_training_timesteps(batch)
            if self.use_timestep_transform:
                t = self.transform(t, model_kwargs, x_start.shape[2])
        t = t.astype("float32")
        noise = paddle.randn(x_start.shape, dtype=x_start.dtype) if noise is None else noise
        # conditioning frames are given clean (t = 0)
        x_t, model_kwargs = condition_training_input(self.add_noise(x_start, noise, t), x_start, mask, model_kwargs)
        mask = None if mask is None else mask.astype("bool")
        velocity = model(x_t, t, **model_kwargs)[:, : x_start.shape[1]]
        squared_error = (velocity - (x_start - noise)) ** 2
        if weights is not None:
            squared_error = squared_error * paddle.to_tensor(np.asarray(weights), dtype="float32")[t.astype("int64")].reshape([-1, 1, 1, 1, 1])
        return {"loss": mean_flat(squared_error, mask)}
