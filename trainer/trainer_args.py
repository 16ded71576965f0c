"""Command-line arguments of `scripts/trainer_opensora.py` besides paddlenlp's `TrainingArguments`."""

import os
from dataclasses import dataclass, field
from typing import List, Optional

from pipelines.open_sora.settings import DEFAULT_MODEL_DIR, REPO_ROOT

DEFAULT_DATA_PATH = os.path.join(REPO_ROOT, "assets", "data", "train.csv")


@dataclass
class ModelArguments:
    model_config: Optional[str] = field(
        default=None,
        metadata={
            "help": "STDiT2 or STDiT3 config JSON (e.g. configs/stdit2/xl2.json, configs/stdit3/xl2.json) to train a new, randomly initialised "
            "model. When unset, training starts from --pretrained_model_path."
        },
    )
    pretrained_model_path: Optional[str] = field(
        default=None,
        metadata={"help": "STDiT2 or STDiT3 directory to fine-tune (save_pretrained / convert_checkpoint.py output). "
                  "Default, when --model_config is not given either: the small model shipped in assets/."},
    )
    vae_path: str = field(
        default=os.path.join(DEFAULT_MODEL_DIR, "vae"),
        metadata={"help": "ppdiffusers AutoencoderKL directory (e.g. converted sd-vae-ft-ema). Default: shipped VAE."},
    )
    text_encoder_path: str = field(
        default=os.path.join(DEFAULT_MODEL_DIR, "text_encoder"),
        metadata={"help": "paddlenlp T5 directory (e.g. converted t5-v1_1-xxl). Default: shipped text encoder."},
    )
    sampler: Optional[str] = field(
        default=None,
        metadata={"help": "Diffusion objective: 'iddpm' (Open-Sora v1.1) or 'rflow' (rectified flow, v1.2). Default: "
                  "the fine-tuned model's (its inference.json); for a new model, iddpm if it predicts sigma, else rflow."},
    )
    rflow_sample_method: str = field(
        default="logit-normal",
        metadata={"help": "rflow training timestep distribution: 'uniform' or 'logit-normal'."},
    )
    rflow_use_timestep_transform: Optional[bool] = field(
        default=None,
        metadata={"help": "rflow: shift training timesteps by resolution and length (Open-Sora v1.2). Default: as "
                  "the fine-tuned model was trained (its inference.json), else false."},
    )
    rflow_transform_scale: Optional[float] = field(
        default=None,
        metadata={"help": "rflow with --rflow_use_timestep_transform: multiplies the shift (v1.2 transform_scale); "
                  "> 1 puts more training steps at high noise, where the layout and motion of a clip are decided. "
                  "Default: the fine-tuned model's, else 1."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the transformer blocks in the backward pass to save memory."}
    )
    freeze: Optional[str] = field(
        default=None,
        metadata={"help": "Freeze part of the model: 'not_temporal' (train only temporal attention; STDiT3: the "
                  "temporal blocks) or 'text' (STDiT2: freeze cross-attention; STDiT3: the caption projection)."},
    )
    vae_micro_batch_size: int = field(
        default=4, metadata={"help": "Frames the VAE encodes at once; bounds its memory. 0 = all frames."}
    )
    text_max_length: Optional[int] = field(
        default=None,
        metadata={"help": "Caption tokens (padded/truncated). Default: the model config's model_max_length."},
    )
    ema_decay: float = field(
        default=0.0, metadata={"help": "Decay of an exponential moving average of the weights; 0 = no EMA."}
    )
    mask_ratios: Optional[str] = field(
        default=None,
        metadata={"help": "JSON object of frame-mask probabilities (names of trainer/mask_generator.py), e.g. "
                  "'{\"mask_no\": 1.0}' to disable conditioning masks. Default: Open-Sora v1.1 ratios."},
    )
    inference_cfg_scale: Optional[float] = field(
        default=None,
        metadata={"help": "Guidance scale recorded in the exported inference.json. Default: the fine-tuned "
                  "model's, else 7 (Open-Sora v1.1's)."},
    )
    max_nonfinite_steps: int = field(
        default=5, metadata={"help": "Stop after this many consecutive steps with a non-finite loss."}
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=DEFAULT_DATA_PATH,
        metadata={"help": "Meta CSV(s) (path,text,num_frames,height,width[,fps,aspect_ratio]); several are "
                  "separated by commas. Build one from a folder with scripts/make_meta.py. Default: the "
                  "small sample set in assets/data."},
    )
    latent_data_path: Optional[str] = field(
        default=None,
        metadata={"help": "Latent CSV from scripts/encode_latents.py: train on pre-encoded VAE posteriors "
                  "instead of decoding and encoding videos at every step (replaces --data_path)."},
    )
    bucket_config: Optional[str] = field(
        default=None,
        metadata={"help": "Multi-resolution bucket JSON (configs/buckets/*.json). When unset every clip is "
                  "resized to --image_size and --num_frames, with --per_device_train_batch_size."},
    )
    num_frames: int = field(default=16, metadata={"help": "Frames per clip when no bucket config is given."})
    image_size: List[int] = field(
        default_factory=lambda: [64, 64], metadata={"help": "Height and width when no bucket config is given."}
    )
    frame_interval: int = field(default=1, metadata={"help": "Take every n-th frame of the source video."})
    transform_name: str = field(
        default="resize_crop", metadata={"help": "'resize_crop' (resize the short side, centre crop) or 'center'."}
    )
    eval_data_path: Optional[str] = field(
        default=None,
        metadata={"help": "Meta CSV of held-out clips; with --eval_steps N the loss at fixed timesteps is "
                  "logged as eval_loss every N steps."},
    )
    eval_max_samples: int = field(default=16, metadata={"help": "Held-out clips used for eval_loss."})
