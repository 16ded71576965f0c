"""Gaussian diffusion as in Open-Sora v1.1 (improved DDPM): linear betas, timestep respacing, learned-range
variance trained with the variational bound, classifier-free guidance on the first `cfg_channel` channels."""

from schedulers.iddpm.gaussian_diffusion import IDDPM, linear_betas, space_timesteps

__all__ = ["IDDPM", "linear_betas", "space_timesteps"]
