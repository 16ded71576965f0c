"""`VideoAutoencoderKL`: a 2-D image VAE (ppdiffusers `AutoencoderKL`) applied frame by frame to videos.

Open-Sora v1.1 uses SD's VAE (`stabilityai/sd-vae-ft-ema`: 8x8 spatial downsampling, 4 latent channels,
scaling factor 0.18215). Any AutoencoderKL directory works the same way; its own `scaling_factor` is read
from its config, so the small VAE shipped in assets/ plugs in exactly like SD's.
"""

import os

import paddle

from utils.errors import UserError

DTYPES = {"float32": paddle.float32, "float16": paddle.float16, "bfloat16": paddle.bfloat16}


def resolve_dtype(dtype):
    """'float32' / 'float16' / 'bfloat16' (or a paddle dtype) -> paddle dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def check_model_dir(path, what, config_key, convert_hint):
    """The config.json of a local directory holding a model of the expected kind, or a clear error."""
    if not os.path.isdir(path):
        if "/" in path and not path.startswith((".", "/")) and not os.path.exists(path):
            raise UserError(
                f"{path}: no such local directory, and hub downloads are not available here; convert local files "
                f"with {convert_hint}"
            )
        raise UserError(f"{path}: {what} directory not found; give the directory written by {convert_hint}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{path}: no config.json; is this a {what} directory? Convert with {convert_hint}")
    import json

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config_key not in config:
        raise UserError(f"{path}: config.json is not a {what} config (no {config_key!r}); pass a {what} directory")
    return config


class VideoAutoencoderKL(paddle.nn.Layer):
    """A ppdiffusers image `AutoencoderKL` applied frame by frame to videos [B, C, T, H, W], with scaled latents.

    `micro_batch_size` frames go through the VAE at once (None: all), which bounds the memory of decoding.
    """

    def __init__(self, module, micro_batch_size=None):
        super().__init__()
        self.module = module
        self.module.eval()
        for param in self.module.parameters():
            param.stop_gradient = True
        config = self.module.config
        self.out_channels = config.latent_channels
        self.scaling_factor = float(config.scaling_factor)
        factor = 2 ** (len(config.block_out_channels) - 1)
        self.patch_size = (1, factor, factor)
        self.temporal_compression = 1
        self.micro_batch_size = micro_batch_size

    @classmethod
    def from_pretrained(cls, path, micro_batch_size=None, dtype="float32"):
        from ppdiffusers import AutoencoderKL

        cls.read_config(path)
        return cls(AutoencoderKL.from_pretrained(path, paddle_dtype=resolve_dtype(dtype)), micro_batch_size)

    def save_pretrained(self, path):
        self.module.save_pretrained(path, safe_serialization=True)

    @staticmethod
    def read_config(path):
        """The AutoencoderKL config.json of `path` (e.g. its `latent_channels`), checked without loading weights."""
        return check_model_dir(path, "VAE (AutoencoderKL)", "latent_channels", "scripts/convert_checkpoint.py vae SRC DST")

    @property
    def dtype(self):
        return self.module.dtype

    def _frame_batches(self, x):
        """[B, C, T, H, W] -> frames [B*T, C, H, W] split into micro-batches."""
        B, C, T, H, W = x.shape
        frames = x.transpose([0, 2, 1, 3, 4]).reshape([B * T, C, H, W])
        step = self.micro_batch_size or B * T
        return [frames[i : i + step] for i in range(0, B * T, step)]

    @staticmethod
    def _to_video(frames, batch):
        """[B*T, C, H, W] -> [B, C, T, H, W]."""
        BT, C, H, W = frames.shape
        return frames.reshape([batch, BT // batch, C, H, W]).transpose([0, 2, 1, 3, 4])

    @paddle.no_grad()
    def encode(self, x, sample_posterior=True):
        """Videos [B, 3, T, H, W] in [-1, 1] -> scaled latents [B, C, T, H/f, W/f]."""
        latents = []
        for frames in self._frame_batches(x.astype(self.dtype)):
            posterior = self.module.encode(frames).latent_dist
            latents.append(posterior.sample() if sample_posterior else posterior.mode())
        return self._to_video(paddle.concat(latents) * self.scaling_factor, x.shape[0])

    @paddle.no_grad()
    def posterior(self, x):
        """Unscaled posterior mean and standard deviation, each [B, C, T, H/f, W/f]."""
        means, stds = [], []
        for frames in self._frame_batches(x.astype(self.dtype)):
            posterior = self.module.encode(frames).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
        return self._to_video(paddle.concat(means), x.shape[0]), self._to_video(paddle.concat(stds), x.shape[0])

    chunk_latent_frames = 1  # frames are encoded one by one: any latent frame can start a condition

    @staticmethod
    def latent_frame_index(frame, num_frames):
        """The latent frame holding frame `frame` of a clip: the same frame, as time is not compressed."""
        return frame

    @paddle.no_grad()
    def decode(self, z, num_frames=None):
        """Scaled latents [B, C, T, h, w] -> videos [B, 3, T, h*f, w*f]; memory bounded by the micro-batch.
        `num_frames`, if given, must be T (the video VAE's decode needs it; this one checks it)."""
        if num_frames is not None and num_frames != z.shape[2]:
            raise UserError(f"num_frames {num_frames} does not match the {z.shape[2]} latent frames of an image VAE")
        output = None
        start = 0
        for latents in self._frame_batches(z.astype(self.dtype)):
            frames = self.module.decode(latents / self.scaling_factor).sample
            if output is None:  # filled in place: no second copy of the whole video, as a concat would make
                output = paddle.empty([z.shape[0] * z.shape[2], *frames.shape[1:]], dtype=frames.dtype)
            output[start : start + frames.shape[0]] = frames
            start += frames.shape[0]
        return self._to_video(output, z.shape[0])

    def get_latent_size(self, input_size):
        """(T, H, W) in pixels -> latent (T, H // f, W // f); None stays None."""
        return [None if size is None else size // patch for size, patch in zip(input_size, self.patch_size)]
