"""Per-frame conditioning shared by the IDDPM and rectified-flow samplers, and the frame-masked loss mean.

A frame mask value m in [0, 1] says how much of the diffusion a frame takes part in: 1 = generated from
noise, 0 = a hard condition kept equal to its reference latent, and 0 < m < 1 = edited: the reference is
held while the timestep is above m * T, noised to that level once when the sampler reaches it, and
generated from there on (SDEdit).
"""

import paddle


class FrameConditioning:
    """Tracks which frames take part in sampling at each step.

    Args:
        mask: [B, T] float frame mask (see the module docstring).
        num_timesteps: the scale of the sampler's timesteps (mask value 1 maps to it).
        strict_model_mask: Open-Sora v1.1 tells the model a frame is generated only once `m*T > t`, so the
            step that re-noises a frame still modulates it as a condition; v1.2 uses `m*T >= t`.
        integer_threshold: v1.1 truncates m*T to an integer timestep index.
    """

    def __init__(self, mask, num_timesteps, strict_model_mask, integer_threshold=False):
        mask = mask.astype("float32")
        threshold = mask * num_timesteps
        self.threshold = threshold.floor() if integer_threshold else threshold
        self.strict_model_mask = strict_model_mask
        # Hard conditions are never noised (they stay exactly the reference); generated frames start as noise.
        self.hard_condition = mask <= 0
        self.noised = (mask >= 1) | self.hard_condition

    def begin_step(self, z, t, add_noise):
        """Prepare step t (a [B] tensor in the sampler's units).

        Returns (z, x_mask, active): z with frames that join the diffusion at this step noised to level t by
        `add_noise(z, t)`; x_mask [B, T] bool for the model (True = generated frame); active [B, T] bool, the
        frames whose update this step keeps (the others are held at their current value).
        """
        reached = self.threshold >= t.astype("float32")[:, None]
        active = reached & ~self.hard_condition
        joining = active & ~self.noised
        self.noised = self.noised | active
        z = paddle.where(frame_axis(joining), add_noise(z, t), z)
        if self.strict_model_mask:
            x_mask = (self.threshold > t.astype("float32")[:, None]) & ~self.hard_condition
        else:
            x_mask = active
        return z, x_mask, active

    @staticmethod
    def end_step(z_before, z_after, active):
        """Keep the update for active frames; held frames keep their value from before the step."""
        return paddle.where(frame_axis(active), z_after, z_before)


def frame_axis(frame_mask):
    """[B, T] -> [B, 1, T, 1, 1], broadcastable against latents [B, C, T, H, W]."""
    return frame_mask[:, None, :, None, None]


def mean_flat(tensor, frame_mask=None):
    """Mean over all but the batch axis; with a [B, T] bool frame mask, over the selected frames only."""
    if frame_mask is None:
        return tensor.reshape([tensor.shape[0], -1]).mean(axis=1)
    weights = frame_axis(frame_mask.astype(tensor.dtype))
    per_frame_elements = tensor.shape[1] * tensor.shape[3] * tensor.shape[4]
    total = (tensor * weights).reshape([tensor.shape[0], -1]).sum(axis=1)
    return total / (frame_mask.astype(tensor.dtype).sum(axis=1) * per_frame_elements).clip(min=1)


def condition_training_input(x_t, x_given, mask, model_kwargs):
    """Training input with conditioning frames (mask False) replaced by `x_given`, and the model kwargs with
    the matching `x_mask`. mask [B, T] bool or None."""
    model_kwargs = dict(model_kwargs)
    if mask is None:
        return x_t, model_kwargs
    mask = mask.astype("bool")
    model_kwargs["x_mask"] = mask
    return paddle.where(frame_axis(mask), x_t, x_given), model_kwargs
