"""`OpenSoraPipeline`: text-to-video with Open-Sora v1.1 (STDiT2, image VAE) or v1.2 (STDiT3, video VAE),
conditioned on images and videos, and chained into long videos.

    pipe = OpenSoraPipeline.from_pretrained("assets/default_model")
    frames = pipe("a red circle moving right on a dark background", seed=0).frames[0]  # uint8 [T, H, W, 3]

A pipeline directory holds `model_index.json` and one folder per component: transformer (STDiT2 or STDiT3,
as its config's model_type says), vae (a ppdiffusers AutoencoderKL applied per frame, or v1.2's video VAE),
text_encoder (paddlenlp T5EncoderModel), tokenizer (T5Tokenizer) and scheduler (`scheduler_config.json` of
RFLOW, IDDPM or DPMSolver). `model_index.json` also records the size the transformer was
trained for, which is the default size of a generation.
"""

import dataclasses
import json
import os
from typing import Callable, List, Optional, Union

import numpy as np
import paddle
from ppdiffusers import DiffusionPipeline
from ppdiffusers.utils import BaseOutput

from models.families import load_transformer, load_vae, read_transformer_config, read_vae_config
from models.stdit.attention_cache import attention_cache_config
from models.text_encoder.streamed_t5 import StreamedT5EncoderModel
from models.text_encoder.t5 import T5Encoder, text_preprocessing
from pipelines.open_sora.conditioning import Conditions, EncodedConditions, fill_conditioned_frames
from schedulers.dpm_solver import DPMSolver
from schedulers.iddpm import IDDPM
from schedulers.rflow import RFLOW
from utils.errors import UserError
from utils.io import atomic_path, read_json_object, write_text_atomic
from utils.media import IMAGE_FPS

# The scheduler classes a scheduler_config.json may name.
SCHEDULER_CLASSES = {"RFLOW": RFLOW, "IDDPM": IDDPM, "DPMSolver": DPMSolver}
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_TYPES = ("np", "pil", "latent")
SIZE_KEYS = ("num_frames", "height", "width", "fps")
# The camera motions Open-Sora v1.2 was trained to follow ("camera motion: pan left." ends the prompt).
CAMERA_MOTIONS = ("pan right", "pan left", "tilt up", "tilt down", "zoom in", "zoom out", "static")


@dataclasses.dataclass
class OpenSoraPipelineOutput(BaseOutput):
    """`frames`: uint8 numpy [B, T, H, W, 3] ("np"), a list of B lists of PIL images ("pil"), or latents
    [B, C, T, h, w] ("latent"). `fps`: the frame rate to save the video at (the conditioning fps divided by
    the frame interval the model was trained with)."""

    frames: Union[np.ndarray, List[list], paddle.Tensor]
    fps: int


def check_dtype(dtype):
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    if dtype != "float32" and not paddle.device.is_compiled_with_cuda():
        raise UserError(f"dtype {dtype} needs a GPU; this Paddle build is CPU-only, use float32")


def load_scheduler(path):
    config = read_json_object(os.path.join(path, SCHEDULER_CONFIG_NAME), "scheduler config")
    class_name = config.pop("_class_name", None)
    if class_name not in SCHEDULER_CLASSES:
        raise UserError(f"{path}: scheduler {class_name!r} is not one of {sorted(SCHEDULER_CLASSES)}")
    return SCHEDULER_CLASSES[class_name](**config)


def save_scheduler(scheduler, path):
    os.makedirs(path, exist_ok=True)
    config = {"_class_name": type(scheduler).__name__, **scheduler.config}
    write_text_atomic(os.path.join(path, SCHEDULER_CONFIG_NAME), json.dumps(config, indent=2) + "\n")


def clean_prompt(text):
    """A prompt cleaned as the captions the model was trained on (URLs, markup and symbols removed)."""
    cleaned = text_preprocessing(text) if isinstance(text, str) else ""
    if not cleaned:
        raise UserError(f"prompt {text!r}: nothing is left after caption cleaning (it removes URLs, markup and "
                        "symbols); describe the video in words")
    return cleaned


def with_scores(text, aesthetic_score=None, motion_score=None, camera_motion=None):
    """A prompt ending with the scores Open-Sora v1.2 was trained with ("... aesthetic score: 6.5."), each
    added unless the prompt already states it."""
    for name, value in (("aesthetic score", aesthetic_score), ("motion score", motion_score)):
        if value is not None and f"{name}:" not in text:
            text = f"{text} {name}: {value:.1f}."
    if camera_motion is not None and "camera motion:" not in text:
        text = f"{text} camera motion: {camera_motion}."
    return text


def scored_prompt(text, scores):
    """The cleaned prompt with `scores` (`with_scores`' arguments) appended before cleaning, as the original."""
    cleaned = clean_prompt(text)  # the one-line error for a prompt of symbols, before any score hides it
    return clean_prompt(with_scores(text, **scores)) if any(value is not None for value in scores.values()) else cleaned


def to_uint8_frames(videos):
    """Videos [B, 3, T, H, W] in [-1, 1] (numpy) -> uint8 [B, T, H, W, 3]."""
    return ((videos.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 4, 1)


class OpenSoraPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, num_frames=None, height=None, width=None,
                 fps=None, frame_interval=1):
        super().__init__()
        if transformer.config.caption_channels != text_encoder.config.d_model or transformer.config.in_channels != vae.out_channels:
            raise UserError(
                f"the transformer expects {transformer.config.in_channels} latent channels and caption width "
                f"{transformer.config.caption_channels}, but the VAE gives {vae.out_channels} and the text encoder "
                f"{text_encoder.config.d_model}; use the VAE and text encoder it was trained with"
            )
        transformer.eval()  # inference mode: caption keys/values are computed once per generation
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        self.register_to_config(num_frames=num_frames, height=height, width=width, fps=fps, frame_interval=frame_interval)

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path, dtype="float32", vae_micro_batch_size=4, scheduler=None, stream_text_encoder=False):
        """Load a pipeline directory (`save_pretrained`'s output). The transformer and VAE run in `dtype`;
        T5 always runs in float32 (its features overflow in fp16). The VAE decodes `vae_micro_batch_size`
        frames at a time. `scheduler` replaces the saved one. `stream_text_encoder=True` keeps one T5 block's
        weights in memory at a time, read from the safetensors checkpoint at every encoding
        (`StreamedT5EncoderModel`): T5-XXL then needs 0.8 GB instead of 19 GB."""
        from paddlenlp.transformers import T5EncoderModel, T5Tokenizer

        check_dtype(dtype)
        index = read_json_object(os.path.join(path, cls.config_name), "pipeline index")
        if index.get("_class_name") != cls.__name__:
            raise UserError(f"{path}: model_index.json describes a {index.get('_class_name')!r}, not an {cls.__name__}")
        text_encoder_path = os.path.join(path, "text_encoder")
        T5Encoder.read_config(text_encoder_path)
        # the streamed encoder loads nothing now; built first, it checks its checkpoint before the other models load
        streamed = StreamedT5EncoderModel.from_pretrained(text_encoder_path) if stream_text_encoder else None
        return cls(
            transformer=load_transformer(os.path.join(path, "transformer"), dtype=dtype),
            vae=load_vae(os.path.join(path, "vae"), vae_micro_batch_size, dtype),
            text_encoder=streamed if stream_text_encoder else T5EncoderModel.from_pretrained(text_encoder_path),
            tokenizer=T5Tokenizer.from_pretrained(os.path.join(path, "tokenizer")),
            scheduler=scheduler or load_scheduler(os.path.join(path, "scheduler")),
            **{key: index[key] for key in (*SIZE_KEYS, "frame_interval") if key in index},
        )

    @classmethod
    def from_component_paths(cls, transformer, vae, text_encoder, scheduler, dtype="float32", vae_micro_batch_size=4,
                             trained_size=None, stream_text_encoder=False):
        """Build from separate directories, as converted official weights come: an STDiT2 or STDiT3, an
        AutoencoderKL or v1.2 video VAE, a T5 directory holding its tokenizer too, and a scheduler object.
        `trained_size`: dict of SIZE_KEYS. `stream_text_encoder`: as in `from_pretrained`."""
        check_dtype(dtype)
        # every directory is checked before any weights load
        read_transformer_config(transformer)
        read_vae_config(vae)
        T5Encoder.read_config(text_encoder)
        caption_encoder = T5Encoder.from_pretrained(text_encoder, stream=stream_text_encoder)
        return cls(
            transformer=load_transformer(transformer, dtype=dtype),
            vae=load_vae(vae, vae_micro_batch_size, dtype),
            text_encoder=caption_encoder.model,
            tokenizer=caption_encoder.tokenizer,
            scheduler=scheduler,
            **(trained_size or {}),
        )

    def save_pretrained(self, path):
        """Write the pipeline directory; it appears complete or not at all."""
        with atomic_path(path) as tmp_path:
            os.makedirs(tmp_path)
            self.transformer.save_pretrained(os.path.join(tmp_path, "transformer"))
            self.vae.save_pretrained(os.path.join(tmp_path, "vae"))
            self.text_encoder.save_pretrained(os.path.join(tmp_path, "text_encoder"), safe_serialization=True)
            self.tokenizer.save_pretrained(os.path.join(tmp_path, "tokenizer"))
            save_scheduler(self.scheduler, os.path.join(tmp_path, "scheduler"))
            self.save_config(tmp_path)

    # ------------------------------------------------------------------------------------------ settings

    @property
    def default_size(self):
        """The size the transformer was trained for (None where unknown): num_frames, height, width, fps."""
        return {key: self.config.get(key) for key in SIZE_KEYS}

    @property
    def default_sampling(self):
        return dict(num_inference_steps=self.scheduler.num_inference_steps, guidance_scale=self.scheduler.cfg_scale)

    @property
    def vae_scale_factor(self):
        return self.vae.patch_size[1]

    @property
    def num_timesteps(self):
        """Model steps of the current (or last) call, over all loops and videos: what a progress bar counts."""
        return self._num_timesteps

    # ---------------------------------------------------------------------------------------- generation

    def check_inputs(self, prompts, conditions, num_frames, height, width, fps, loop, condition_frame_length, align,
                     num_inference_steps, guidance_scale, seed, num_videos_per_prompt, output_type, callback_on_step_end):
        for name, value in dict(num_frames=num_frames, height=height, width=width, fps=fps).items():
            if value is None:
                raise UserError(f"{name} is not given and the pipeline has no default for it; pass {name}=...")
        for name, value in dict(num_frames=num_frames, height=height, width=width, fps=fps, loop=loop, align=align,
                                num_inference_steps=num_inference_steps, num_videos_per_prompt=num_videos_per_prompt).items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise UserError(f"height {height} and width {width} must be multiples of {self.vae_scale_factor} (the VAE's downsampling)")
        if isinstance(self.scheduler, IDDPM) and num_inference_steps < 2:
            raise UserError("num_inference_steps must be at least 2 with IDDPM (its variance at t = 0 is clipped to the next step's)")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise UserError(f"seed must be an integer or None, got {seed!r}")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool):
            raise UserError(f"guidance_scale must be a number, got {guidance_scale!r}")
        if loop > 1 and not 0 < condition_frame_length < num_frames:
            raise UserError(f"condition_frame_length {condition_frame_length} must be between 1 and num_frames - 1 ({num_frames - 1})")
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type {output_type!r} is not one of {list(OUTPUT_TYPES)}")
        if output_type == "latent" and loop > 1:
            raise UserError("output_type 'latent' returns one clip; use loop=1 (the clips of a long video overlap)")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise UserError("callback_on_step_end must be callable (pipe, step_index, timestep, callback_kwargs) -> dict")
        if len(conditions) != len(prompts):
            raise UserError(f"{len(conditions)} conditions for {len(prompts)} prompts; give one per prompt (None for none)")
        for per_loop in prompts:
            if len(per_loop) != loop:
                raise UserError(f"a prompt given per loop has {len(per_loop)} texts for loop={loop}; give one per loop")
        for item in conditions:
            item.check(num_frames, loop)

    @staticmethod
    def prompts_per_loop(prompt, loop, scores=None):
        """prompt: a text, a list of texts (one video each), or a list whose items are lists of texts (one per
        loop). Returns cleaned texts [video][loop], each ending with the `scores` (`with_scores`' arguments)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UserError("prompt is empty; give a text or a list of texts")
        per_loop = [[item] * loop if isinstance(item, str) else list(item) for item in prompts]
        return [[scored_prompt(text, scores or {}) for text in texts] for texts in per_loop]

    @staticmethod
    def check_scores(aesthetic_score, motion_score, camera_motion):
        for name, value in dict(aesthetic_score=aesthetic_score, motion_score=motion_score).items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise UserError(f"{name} must be a number or None, got {value!r}")
        if camera_motion is not None and camera_motion not in CAMERA_MOTIONS:
            raise UserError(f"camera_motion {camera_motion!r} is not one of {list(CAMERA_MOTIONS)}")

    def default_condition_frame_length(self, num_frames):
        """Frames of a clip that start the next one in a long video: one temporal chunk of a video VAE (17
        frames, v1.2's 5 latent frames), a quarter of the clip with an image VAE."""
        if self.vae.chunk_latent_frames > 1 and self.vae.micro_frame_size and self.vae.micro_frame_size < num_frames:
            return self.vae.micro_frame_size
        return max(1, num_frames // 4)

    def encode_references(self, conditions, height, width):
        """EncodedConditions per video: each reference read at the generation size and encoded once."""
        encoded = []
        for item in conditions:
            latents = [self.vae.encode(paddle.to_tensor(ref.pixels(height, width))[None])[0] for ref in item.references]
            encoded.append(EncodedConditions(latents, [ref.num_frames for ref in item.references], list(item.mask_groups)))
        return encoded

    def size_arguments(self, batch_size, num_frames, height, width, fps):
        values = dict(height=height, width=width, num_frames=num_frames, ar=height / width,
                      fps=IMAGE_FPS if num_frames == 1 else fps)
        dtype = self.transformer.x_embedder.proj.weight.dtype
        return {key: paddle.full([batch_size], value, dtype=dtype) for key, value in values.items()}

    @paddle.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[Union[str, List[str]]]],
        *,
        num_frames: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        fps: Optional[int] = None,
        conditions: Union[Conditions, List[Optional[Conditions]], None] = None,
        loop: int = 1,
        condition_frame_length: Optional[int] = None,
        align: Optional[int] = None,
        aesthetic_score: Optional[float] = None,
        motion_score: Optional[float] = None,
        camera_motion: Optional[str] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        attention_cache=None,
        seed: Optional[int] = None,
        num_videos_per_prompt: int = 1,
        output_type: str = "np",
        callback_on_step_end: Optional[Callable] = None,
        return_dict: bool = True,
    ):
        """Generate one video per prompt (times `num_videos_per_prompt`).

        Args:
            prompt: a text, or a list (one video each) whose items may be lists of one text per loop.
            num_frames, height, width, fps: of each clip; default: what the model was trained for. fps is the
                frame rate the model is conditioned on.
            conditions: `Conditions` for every prompt, or a list of one (or None) per prompt.
            loop: clips chained into one video; each later clip starts with the last `condition_frame_length`
                frames of the one before (default: 17 frames, one chunk, with v1.2's video VAE; a quarter of
                num_frames with an image VAE) and adds num_frames minus those.
            align: conditioned latent frames start at a multiple of `align` latent frames (default: the VAE's
                `chunk_latent_frames`, 5 for v1.2 as its sample config, 1 = where the frames fall).
            aesthetic_score, motion_score, camera_motion: appended to every prompt as Open-Sora v1.2 was trained
                ("aesthetic score: 6.5."); camera_motion is one of CAMERA_MOTIONS. v1.1 models never saw them.
            num_inference_steps, guidance_scale: default: the scheduler's.
            attention_cache: reuse attention outputs across neighbouring steps (Pyramid Attention Broadcast):
                a preset name ("quality", "balanced", "fast") or an `AttentionCacheConfig`; None computes every
                step in full.
            seed: the same seed and arguments give the same frames; the global random state is left as it was.
            num_videos_per_prompt: drawn one after another from the seed's random stream.
            callback_on_step_end: `fn(pipe, step_index, timestep, {"latents": z}) -> dict` after every model step
                (step_index counts over all loops and videos up to `pipe.num_timesteps`); latents it returns
                replace the current ones.
        """
        size = {**self.default_size, **{k: v for k, v in dict(num_frames=num_frames, height=height, width=width, fps=fps).items() if v is not None}}
        num_frames, height, width, fps = (size[key] for key in SIZE_KEYS)
        if num_inference_steps is None:
            num_inference_steps = self.default_sampling["num_inference_steps"]
        guidance_scale = self.default_sampling["guidance_scale"] if guidance_scale is None else guidance_scale
        if condition_frame_length is None and num_frames is not None:
            condition_frame_length = self.default_condition_frame_length(num_frames)
        align = self.vae.chunk_latent_frames if align is None else align
        self.check_scores(aesthetic_score, motion_score, camera_motion)
        if attention_cache is not None:
            attention_cache = attention_cache_config(attention_cache)
        prompts = self.prompts_per_loop(prompt, loop, dict(aesthetic_score=aesthetic_score, motion_score=motion_score,
                                                           camera_motion=camera_motion))
        if conditions is None or isinstance(conditions, Conditions):
            conditions = [conditions] * len(prompts)
        conditions = [Conditions() if item is None else item for item in conditions]
        self.check_inputs(prompts, conditions, num_frames, height, width, fps, loop, condition_frame_length, align,
                          num_inference_steps, guidance_scale, seed, num_videos_per_prompt, output_type, callback_on_step_end)

        scheduler = self.scheduler.with_sampling_steps(num_inference_steps)
        self._num_timesteps = scheduler.num_inference_steps * loop * num_videos_per_prompt
        rng_state = paddle.get_rng_state()
        paddle.seed(int(np.random.default_rng().integers(2**31)) if seed is None else seed)
        try:
            encoded = self.encode_references(conditions, height, width)
            with self.progress_bar(total=self._num_timesteps) as progress_bar, \
                    self.transformer.attention_cache_enabled(attention_cache):
                draws = []
                for draw in range(num_videos_per_prompt):
                    def step_callback(step_index, t, latents, offset=draw * loop * scheduler.num_inference_steps):
                        return self._after_step(offset, step_index, t, latents, scheduler, progress_bar, callback_on_step_end)

                    draws.append(self.generate_long_video(prompts, [item.copy() for item in encoded], scheduler, num_frames, height, width, fps,
                                                          loop, condition_frame_length, align, guidance_scale, output_type,
                                                          step_callback))
        finally:
            paddle.set_rng_state(rng_state)

        # prompt-major order: all videos of the first prompt, then of the second, ...
        videos = [draws[k][i] for i in range(len(prompts)) for k in range(num_videos_per_prompt)]
        if output_type == "latent":
            frames = paddle.stack(videos)
        else:
            frames = to_uint8_frames(np.stack(videos))
            if output_type == "pil":
                from PIL import Image

                frames = [[Image.fromarray(frame) for frame in video] for video in frames]
        self.maybe_free_model_hooks()
        save_fps = max(1, fps // self.config.frame_interval)
        if not return_dict:
            return (frames, save_fps)
        return OpenSoraPipelineOutput(frames=frames, fps=save_fps)

    def _after_step(self, offset, step_index, t, latents, scheduler, progress_bar, callback_on_step_end):
        progress_bar.update()
        if callback_on_step_end is None:
            return latents
        outputs = callback_on_step_end(self, offset + step_index, t, {"latents": latents}) or {}
        return outputs.get("latents", latents)

    def generate_long_video(self, prompts, encoded, scheduler, num_frames, height, width, fps, loop,
                            condition_frame_length, align, guidance_scale, output_type, step_callback):
        """Videos (numpy [3, T, H, W] in [-1, 1], or latents [C, T, h, w]) of `loop` chained clips;
        `encoded`: EncodedConditions per prompt, which the loops extend."""
        latent_size = self.vae.get_latent_size([num_frames, height, width])
        size_args = self.size_arguments(len(prompts), num_frames, height, width, fps)
        caption_encoder = T5Encoder(self.text_encoder, self.tokenizer, self.transformer.config.model_max_length)
        caption_encoder.y_embedder = self.transformer.y_embedder  # the learned null caption
        clips = []
        for loop_index in range(loop):
            if loop_index > 0:
                # the decoded end of the previous clip is encoded again, as the original does
                previous = self.vae.encode(clips[-1][:, :, -condition_frame_length:])
                for i, item in enumerate(encoded):
                    item.add_loop_reference(previous[i], condition_frame_length, loop_index)
            z = paddle.randn([len(prompts), self.vae.out_channels, *latent_size], dtype="float32")
            frame_mask = fill_conditioned_frames(z, encoded, loop_index, num_frames, self.vae, align)
            samples = scheduler.sample(
                self.transformer, caption_encoder, z=z, prompts=[texts[loop_index] for texts in prompts],
                additional_args=size_args, mask=frame_mask, progress=False, cfg_scale=guidance_scale,
                step_callback=lambda i, t, z, first=loop_index * scheduler.num_inference_steps: step_callback(first + i, t, z),
            )
            if output_type == "latent":
                return list(samples)
            clips.append(self.vae.decode(samples.astype(self.vae.dtype), num_frames=num_frames).astype("float32"))
        parts = [clips[0]] + [clip[:, :, condition_frame_length:] for clip in clips[1:]]
        return list(paddle.concat(parts, axis=2).numpy())
