"""Classifier-free guidance shared by both samplers: one model call on the doubled batch per step."""

import paddle


def encode_prompts(model, text_encoder, prompts):
    """Caption conditioning for the doubled batch [prompts, null captions], prepared once per generation.

    Models that can precompute their cross-attention keys/values (`encode_caption`) get them here, so the
    sampling steps do not re-project the caption in every block.
    """
    text = text_encoder.encode(prompts)
    y = paddle.concat([text["y"], text_encoder.null(len(prompts)).astype(text["y"].dtype)], axis=0)
    if hasattr(model, "encode_caption"):
        return {"y": model.encode_caption(y, text["mask"])}
    return {"y": y, "mask": text["mask"]}


def doubled(additional_args):
    """Repeat per-sample conditioning tensors ([B, ...]) for the [conditional, unconditional] batch."""
    return {key: paddle.concat([value, value], axis=0) for key, value in additional_args.items()}


def guided_prediction(model, z, t, text_args, size_args, x_mask, cfg_scale, guided_channels):
    """Model output for z [B, ...] with guidance `uncond + scale * (cond - uncond)`.

    Only the first `guided_channels` output channels are guided (Open-Sora v1.1's `cfg_channel`); the other
    channels come from the conditional half. `size_args` are already doubled.
    """
    z_in = paddle.concat([z, z], axis=0)
    t_in = paddle.concat([t, t], axis=0)
    x_mask_in = None if x_mask is None else paddle.concat([x_mask, x_mask], axis=0)
    output = model(z_in, t_in, x_mask=x_mask_in, **text_args, **size_args)
    cond, uncond = output.chunk(2, axis=0)
    guided = uncond[:, :guided_channels] + cfg_scale * (cond[:, :guided_channels] - uncond[:, :guided_channels])
    return paddle.concat([guided, cond[:, guided_channels:]], axis=1)
