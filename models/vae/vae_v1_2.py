"""Open-Sora v1.2's video VAE: an image VAE frame by frame, then a causal temporal VAE over chunks of frames.

A video [B, 3, T, H, W] in [-1, 1] becomes latents [B, 4, T', H/8, W/8] in three steps:

1. the spatial VAE (SD-XL's `AutoencoderKL`, run per frame by `VideoAutoencoderKL`) gives 4 x H/8 x W/8 per
   frame, times its `scaling_factor`. The original multiplies by SD's 0.18215 whatever the image VAE's own
   config says (SD-XL's says 0.13025), so the converted `spatial_vae` config carries 0.18215;
2. the temporal VAE (`TemporalVAE`, MAGVIT-v2 style causal 3-D convolutions) compresses time 4x. Clips are
   cut into chunks of `micro_frame_size` (17) frames that are encoded independently; a chunk of n frames is
   padded with zeros in front to a multiple of 4 and gives ceil(n / 4) latent frames;
3. latents are normalised per channel: (z - shift) / scale.

So T frames give 5 * (T // 17) + ceil((T % 17) / 4) latent frames: 17 -> 5, 34 -> 10, 51 -> 15, 20 -> 6
(`get_latent_size`). Decoding runs the same chunks backwards and drops each chunk's front padding, which is
why `decode` takes the number of frames to produce (by default, all the latents can hold).

`save_pretrained` writes a directory like our STDiT's: `config.json` (`VideoAutoencoderV1_2Config`: the
AutoencoderKL arguments, the `TemporalVAEConfig`, micro_frame_size, scale, shift) and `model.safetensors`
holding both VAEs under the original's parameter names (`spatial_vae.module.*`, `temporal_vae.*`), so an
official checkpoint maps onto it key for key (`scripts/convert_checkpoint.py vae-v1.2`).
"""

import dataclasses
import json
import math
import os

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from models.vae.vae import VideoAutoencoderKL, check_model_dir, resolve_dtype
from utils.errors import UserError
from utils.io import read_json_object, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONVERT_HINT = "scripts/convert_checkpoint.py vae-v1.2 SRC DST"
ACTIVATIONS = {"swish": F.silu, "relu": F.relu}


def config_from_dict(config_class, values, source):
    """A config dataclass from a dict whose keys must all be fields of it."""
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{source}: unknown {config_class.__name__} keys {unknown[:5]}; known keys are {sorted(known)}")
    return config_class(**values)


@dataclasses.dataclass
class TemporalVAEConfig:
    """Constructor arguments of `TemporalVAE`, named as the original's `VAE_Temporal` names them; the defaults
    are the released model's (`VAE_Temporal_SD`).

    Stage i has `num_res_blocks` residual blocks of `filters * channel_multipliers[i]` channels; between
    stages i and i + 1 time is halved where `temporal_downsample[i]` is true (never space).
    `latent_embed_dim` is the width of the encoder's output and the decoder's input, `embed_dim` the number
    of latent channels.
    """

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple = (1, 2, 2, 4)
    temporal_downsample: tuple = (False, True, True)
    num_groups: int = 32
    activation_fn: str = "swish"

    def __post_init__(self):
        self.channel_multipliers = tuple(self.channel_multipliers)
        self.temporal_downsample = tuple(bool(flag) for flag in self.temporal_downsample)
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise UserError(
                f"TemporalVAE config: temporal_downsample {list(self.temporal_downsample)} needs one entry per gap "
                f"between the {len(self.channel_multipliers)} stages of channel_multipliers"
            )
        if self.activation_fn not in ACTIVATIONS:
            raise UserError(f"TemporalVAE config: activation_fn {self.activation_fn!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def stage_channels(self):
        return [self.filters * multiplier for multiplier in self.channel_multipliers]

    @property
    def time_compression(self):
        return 2 ** sum(self.temporal_downsample)

    def to_dict(self):
        values = dataclasses.asdict(self)
        values.update(channel_multipliers=list(self.channel_multipliers), temporal_downsample=list(self.temporal_downsample))
        return values


class CausalConv3d(nn.Layer):
    """A 3-D convolution padded in time on the past side only: output frame t sees input frames up to t
    (zeros before the first frame). Height and width are padded to keep their size; a time stride s maps
    T frames to ceil(T / s)."""

    def __init__(self, in_channels, out_channels, kernel_size, time_stride=1, bias=True):
        super().__init__()
        time_kernel, height_kernel, width_kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        # F.pad order for NCDHW: width, height, time, each (before, after).
        self.padding = [width_kernel // 2] * 2 + [height_kernel // 2] * 2 + [time_kernel - time_stride, 0]
        self.conv = nn.Conv3D(
            in_channels, out_channels, (time_kernel, height_kernel, width_kernel), stride=(time_stride, 1, 1),
            bias_attr=None if bias else False,
        )

    def forward(self, x):
        return self.conv(F.pad(x, self.padding, data_format="NCDHW"))


class ResBlock(nn.Layer):
    """GroupNorm -> activation -> causal 3x3x3 conv, twice, plus the input (through a 1x1x1 conv when the
    width changes)."""

    def __init__(self, in_channels, out_channels, num_groups, activation):
        super().__init__()
        self.activation = activation
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, bias=False)
        self.conv3 = CausalConv3d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(self.activation(self.norm1(x)))
        h = self.conv2(self.activation(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


def residual_stage(config, in_channels, out_channels):
    """`num_res_blocks` blocks taking `in_channels` to `out_channels`, the first one changing the width."""
    activation = ACTIVATIONS[config.activation_fn]
    return nn.LayerList(
        [ResBlock(in_channels if i == 0 else out_channels, out_channels, config.num_groups, activation) for i in range(config.num_res_blocks)]
    )


class TemporalEncoder(nn.Layer):
    """[B, in_out_channels, T, h, w] -> [B, 2 * latent_embed_dim, T / time_compression, h, w]."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.activation_fn]
        widths = config.stage_channels
        self.conv_in = CausalConv3d(config.in_out_channels, config.filters, 3, bias=False)
        self.block_res_blocks = nn.LayerList(
            [residual_stage(config, config.filters if i == 0 else widths[i - 1], width) for i, width in enumerate(widths)]
        )
        # Stage i is followed by conv_blocks[i]; an Identity where time is kept, so indices stay the original's.
        self.conv_blocks = nn.LayerList(
            [CausalConv3d(widths[i], widths[i], 3, time_stride=2) if downsample else nn.Identity()
             for i, downsample in enumerate(config.temporal_downsample)]
        )
        self.res_blocks = residual_stage(config, widths[-1], widths[-1])
        self.norm1 = nn.GroupNorm(config.num_groups, widths[-1])
        self.conv2 = CausalConv3d(widths[-1], 2 * config.latent_embed_dim, 1)

    def forward(self, x):
        x = self.conv_in(x)
        for i, stage in enumerate(self.block_res_blocks):
            for block in stage:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(self.activation(self.norm1(x)))


def depth_to_time(x, factor):
    """[B, C * factor, T, H, W] -> [B, C, T * factor, H, W]: channel c * factor + k becomes frame t * factor + k."""
    B, C, T, H, W = x.shape
    x = x.reshape([B, C // factor, factor, T, H, W]).transpose([0, 1, 3, 2, 4, 5])
    return x.reshape([B, C // factor, T * factor, H, W])


class TemporalDecoder(nn.Layer):
    """[B, latent_embed_dim, T', h, w] -> [B, in_out_channels, T' * time_compression, h, w]; the encoder's
    stages in reverse, time doubled by a conv to twice the channels followed by `depth_to_time`."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.activation_fn]
        self.temporal_upsample = config.temporal_downsample
        widths = config.stage_channels
        self.conv1 = CausalConv3d(config.latent_embed_dim, widths[-1], 3)
        self.res_blocks = residual_stage(config, widths[-1], widths[-1])
        # Stage i (run from the last to the first) reads the width of stage i + 1; conv_blocks[i] follows stage i + 1.
        self.block_res_blocks = nn.LayerList(
            [residual_stage(config, widths[min(i + 1, len(widths) - 1)], width) for i, width in enumerate(widths)]
        )
        self.conv_blocks = nn.LayerList(
            [CausalConv3d(widths[i + 1], 2 * widths[i + 1], 3) if upsample else nn.Identity()
             for i, upsample in enumerate(config.temporal_downsample)]
        )
        self.norm1 = nn.GroupNorm(config.num_groups, widths[0])
        self.conv_out = CausalConv3d(widths[0], config.in_out_channels, 3)

    def forward(self, z):
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0 and self.temporal_upsample[i - 1]:
                x = depth_to_time(self.conv_blocks[i - 1](x), 2)
        return self.conv_out(self.activation(self.norm1(x)))


class TemporalVAE(nn.Layer):
    """The original's `VAE_Temporal`: a KL autoencoder over time only, on [B, C, T, h, w] frame latents."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = TemporalEncoder(config)
        self.quant_conv = CausalConv3d(2 * config.latent_embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(config.embed_dim, config.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(config)

    def latent_frames(self, num_frames):
        return math.ceil(num_frames / self.config.time_compression)

    def encode(self, x):
        """[B, C, T, h, w] -> posterior over [B, embed_dim, ceil(T / time_compression), h, w]; T is first padded
        with zero frames in front to a multiple of the compression."""
        from ppdiffusers.models.vae import DiagonalGaussianDistribution

        front_padding = -x.shape[2] % self.config.time_compression
        x = F.pad(x, [0, 0, 0, 0, front_padding, 0], data_format="NCDHW")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z, num_frames):
        """[B, embed_dim, T', h, w] -> [B, C, num_frames, h, w] for T' = ceil(num_frames / time_compression):
        of the T' * time_compression decoded frames, the first ones stand for the encoder's front padding."""
        x = self.decoder(self.post_quant_conv(z))
        front_padding = -num_frames % self.config.time_compression
        return x[:, :, front_padding:]


@dataclasses.dataclass
class VideoAutoencoderV1_2Config:
    """Constructor arguments of `VideoAutoencoderV1_2`, saved as its `config.json`.

    `spatial_vae`: ppdiffusers `AutoencoderKL` arguments; its `scaling_factor` is the one applied to the frame
    latents (0.18215 for the released model). `micro_frame_size`: frames per temporal chunk (None: the whole
    clip is one chunk). `scale` and `shift`: per latent channel (or one number for all).
    """

    spatial_vae: dict
    temporal_vae: TemporalVAEConfig = dataclasses.field(default_factory=TemporalVAEConfig)
    micro_frame_size: int | None = 17
    scale: list = (3.85, 2.32, 2.33, 3.06)
    shift: list = (-0.10, 0.34, 0.27, 0.98)

    def __post_init__(self):
        # ppdiffusers adds bookkeeping ("_class_name", "_diffusers_version", ...) to the configs it writes.
        self.spatial_vae = {key: value for key, value in dict(self.spatial_vae).items() if not key.startswith("_")}
        if isinstance(self.temporal_vae, dict):
            self.temporal_vae = config_from_dict(TemporalVAEConfig, self.temporal_vae, "temporal_vae")
        self.scale, self.shift = (value if np.ndim(value) == 0 else list(value) for value in (self.scale, self.shift))
        if self.micro_frame_size is not None and self.micro_frame_size < 1:
            raise UserError(f"VAE v1.2 config: micro_frame_size {self.micro_frame_size} must be a positive frame count or null")

    @classmethod
    def from_json_file(cls, path):
        return config_from_dict(cls, read_json_object(path, "VAE v1.2 config (e.g. configs/vae_v1_2/tiny.json)"), path)

    def to_dict(self):
        values = dataclasses.asdict(self)
        values["temporal_vae"] = self.temporal_vae.to_dict()
        return values


def as_channel_vector(value):
    """A per-channel number (or one for all channels) as [1, C, 1, 1, 1], to broadcast over [B, C, T, H, W]."""
    return paddle.to_tensor(np.reshape(np.asarray(value, dtype=np.float32), [1, -1, 1, 1, 1]))


class VideoAutoencoderV1_2(nn.Layer):
    """Open-Sora v1.2's VAE on videos [B, 3, T, H, W]; latents [B, C, T', H/f, W/f] with T' = get_latent_size.

    Same interface as `VideoAutoencoderKL`: `from_pretrained(path, micro_batch_size, dtype)`, `encode`,
    `decode`, `get_latent_size`, `out_channels`, `patch_size` = (time compression, f, f) and
    `temporal_compression` = 4. Time is compressed per chunk of 17 frames (17 -> 5), not by 4 throughout, so
    latent frame counts must come from `get_latent_size`, never from dividing by `temporal_compression`.
    `micro_batch_size` frames at a time go through the spatial VAE (None: all).
    """

    def __init__(self, config: VideoAutoencoderV1_2Config, micro_batch_size=None):
        super().__init__()
        from ppdiffusers import AutoencoderKL

        self.config = config
        self.spatial_vae = VideoAutoencoderKL(AutoencoderKL(**config.spatial_vae), micro_batch_size)
        self.temporal_vae = TemporalVAE(config.temporal_vae)
        self.temporal_vae.eval()
        for param in self.temporal_vae.parameters():
            param.stop_gradient = True
        self.micro_frame_size = config.micro_frame_size
        self.temporal_compression = config.temporal_vae.time_compression
        self.patch_size = (self.temporal_compression, *self.spatial_vae.patch_size[1:])
        self.out_channels = config.temporal_vae.embed_dim

    # ------------------------------------------------------------------------------------------ files

    @staticmethod
    def read_config(path):
        """The `VideoAutoencoderV1_2Config` of a directory, checked without loading weights."""
        values = check_model_dir(path, "VAE v1.2", "temporal_vae", CONVERT_HINT)
        return config_from_dict(VideoAutoencoderV1_2Config, values, os.path.join(path, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, path, micro_batch_size=None, dtype="float32"):
        config = cls.read_config(path)
        model = cls(config, micro_batch_size)
        model.load_weights(os.path.join(path, WEIGHTS_NAME))
        model.to(dtype=resolve_dtype(dtype))
        return model

    def save_pretrained(self, path):
        """Write `config.json` and `model.safetensors` (bf16 weights are stored as fp32: numpy has no bf16)."""
        from safetensors.numpy import save_file

        state = {}
        for name, tensor in self.state_dict().items():
            if tensor.dtype == paddle.bfloat16:
                tensor = tensor.astype("float32")
            state[name] = np.ascontiguousarray(tensor.numpy())
        os.makedirs(path, exist_ok=True)
        save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "paddle"})
        write_text_atomic(os.path.join(path, CONFIG_NAME), json.dumps(self.config.to_dict(), indent=2) + "\n")

    def load_weights(self, weights_path):
        """Load a safetensors file whose names and shapes must match this model's exactly."""
        from safetensors.numpy import load_file

        if not os.path.isfile(weights_path):
            raise UserError(f"{weights_path}: weights not found; convert official weights with {CONVERT_HINT}")
        try:
            weights = load_file(weights_path)
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for bad files
            raise UserError(f"{weights_path}: cannot read the weights ({error}); the file may be truncated") from None
        state = self.state_dict()
        problems = [
            *(f"missing {name}" for name in state if name not in weights),
            *(f"unexpected {name}" for name in weights if name not in state),
            *(f"{name} {list(weights[name].shape)} != {list(state[name].shape)}"
              for name in state if name in weights and list(weights[name].shape) != list(state[name].shape)),
        ]
        if problems:
            raise UserError(f"{weights_path}: weights do not match config.json ({len(problems)} problems: "
                            f"{', '.join(problems[:3])}{', ...' if len(problems) > 3 else ''})")
        self.set_state_dict({name: paddle.to_tensor(array).astype(state[name].dtype) for name, array in weights.items()})

    @property
    def dtype(self):
        return self.spatial_vae.dtype

    # ------------------------------------------------------------------------------------------ frames

    def chunk_frames(self, num_frames):
        """Frames in each temporal chunk of a clip: `micro_frame_size` each, the rest in a shorter last one."""
        step = self.micro_frame_size or num_frames
        return [min(step, num_frames - start) for start in range(0, num_frames, step)]

    def get_latent_size(self, input_size):
        """(T, H, W) in pixels -> latent (T', H // f, W // f); None stays None. T' = 5 * (T // 17) +
        ceil((T % 17) / 4) with the released settings: each chunk is compressed on its own."""
        frames, *spatial = self.spatial_vae.get_latent_size(input_size)
        if frames is not None:
            frames = sum(self.temporal_vae.latent_frames(n) for n in self.chunk_frames(frames))
        return [frames, *spatial]

    @property
    def chunk_latent_frames(self):
        """Latent frames of one full temporal chunk (5 for 17 frames): conditions copied from a reference keep
        their meaning when they start on a multiple of it (Open-Sora v1.2's `align`)."""
        return self.get_latent_size([self.micro_frame_size or 1, None, None])[0]

    def latent_frame_index(self, frame, num_frames):
        """The latent frame holding frame `frame` (0-based) of a clip of `num_frames` frames. Each chunk is padded
        in front to a multiple of the time compression, so its first frame has a latent frame of its own and
        each later latent frame holds the next `temporal_compression` frames."""
        latent_start = 0
        for chunk_start, frames in zip(range(0, num_frames, self.micro_frame_size or num_frames), self.chunk_frames(num_frames)):
            if frame < chunk_start + frames:
                return latent_start + (frame - chunk_start + -frames % self.temporal_compression) // self.temporal_compression
            latent_start += self.temporal_vae.latent_frames(frames)
        raise ValueError(f"frame {frame} is outside a clip of {num_frames} frames")

    def decoded_chunk_frames(self, latent_frames, num_frames=None):
        """(latent frames, frames) of each chunk that decoding `latent_frames` latents into `num_frames` frames
        runs; num_frames None: all the latents hold (a full chunk of latents gives `micro_frame_size` frames,
        a shorter last one `temporal_compression` frames per latent frame)."""
        if num_frames is not None:
            frames = self.chunk_frames(num_frames)
            latents = [self.temporal_vae.latent_frames(n) for n in frames]
            if sum(latents) != latent_frames:
                raise UserError(f"num_frames {num_frames} is encoded in {sum(latents)} latent frames, but the latents have "
                                f"{latent_frames}; pass the frame count the latents were made for")
            return list(zip(latents, frames))
        if self.micro_frame_size is None:
            return [(latent_frames, latent_frames * self.temporal_compression)]
        full_chunk = self.temporal_vae.latent_frames(self.micro_frame_size)
        chunks = []
        for start in range(0, latent_frames, full_chunk):
            latents = min(full_chunk, latent_frames - start)
            chunks.append((latents, self.micro_frame_size if latents == full_chunk else latents * self.temporal_compression))
        return chunks

    # ------------------------------------------------------------------------------------------ coding

    # `posterior` is already in the normalised latent space that the transformer sees.
    scaling_factor = 1.0

    def temporal_posteriors(self, frame_latents):
        """The temporal VAE's posterior of each chunk of the spatial latents [B, C, T, h, w]."""
        posteriors, start = [], 0
        for frames in self.chunk_frames(frame_latents.shape[2]):
            posteriors.append(self.temporal_vae.encode(frame_latents[:, :, start : start + frames]))
            start += frames
        return posteriors

    def normalise(self, z):
        return (z - as_channel_vector(self.config.shift).astype(z.dtype)) / as_channel_vector(self.config.scale).astype(z.dtype)

    @paddle.no_grad()
    def encode(self, x, sample_posterior=True):
        """Videos [B, 3, T, H, W] in [-1, 1] -> normalised latents [B, C, T', H/f, W/f] (T' = get_latent_size).
        sample_posterior False: the posterior means of both VAEs, a deterministic encoding."""
        posteriors = self.temporal_posteriors(self.spatial_vae.encode(x, sample_posterior))
        return self.normalise(paddle.concat([p.sample() if sample_posterior else p.mode() for p in posteriors], axis=2))

    @paddle.no_grad()
    def posterior(self, x):
        """Normalised mean and standard deviation [B, C, T', h, w] of the temporal posterior of the spatial
        posterior's mean: what scripts/encode_latents.py stores, from which training draws mean + std * noise.
        (Encoding during training draws the spatial latents too; here they are their mean.)"""
        posteriors = self.temporal_posteriors(self.spatial_vae.encode(x, sample_posterior=False))
        mean = paddle.concat([p.mean for p in posteriors], axis=2)
        std = paddle.concat([p.std for p in posteriors], axis=2)
        return self.normalise(mean), std / as_channel_vector(self.config.scale).astype(std.dtype)

    @paddle.no_grad()
    def decode(self, z, num_frames=None):
        """Normalised latents [B, C, T', h, w] -> videos [B, 3, num_frames, h*f, w*f]. `num_frames`: the frame
        count the latents stand for (see `get_latent_size`); None: all they can hold (T' = 15 -> 51 frames)."""
        z = z * as_channel_vector(self.config.scale).astype(z.dtype) + as_channel_vector(self.config.shift).astype(z.dtype)
        frame_latents, start = [], 0
        for latents, frames in self.decoded_chunk_frames(z.shape[2], num_frames):
            frame_latents.append(self.temporal_vae.decode(z[:, :, start : start + latents], frames))
            start += latents
        return self.spatial_vae.decode(paddle.concat(frame_latents, axis=2))
