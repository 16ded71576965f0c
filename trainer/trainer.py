"""`OpenSoraTrainer`: the paddlenlp `Trainer` with Open-Sora's diffusion loss.

The model the Trainer optimises and checkpoints is the STDiT2 alone; the VAE and the T5 encoder are frozen
helpers that turn a batch of videos and captions into latents and text features without autograd.
"""

import contextlib
import json
import os
import shutil

import numpy as np
import paddle
from paddlenlp.trainer import Trainer, TrainerCallback
from paddlenlp.trainer.integrations import VisualDLCallback as PaddleNLPVisualDLCallback
from paddlenlp.transformers.model_utils import unwrap_model
from paddlenlp.utils.log import logger

from utils.errors import UserError
from utils.io import write_text_atomic

EMA_DIR_NAME = "ema"
COMPLETE_MARKER = "checkpoint_complete"
# Timesteps of the held-out loss, as fractions of the diffusion length (the Open-Sora v1.2 "loss eval").
EVAL_TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def size_conditions(batch, dtype="float32"):
    """The per-sample size/length/fps conditioning STDiT2 expects, as float tensors [B]."""
    return {key: paddle.to_tensor(np.asarray(batch[key]), dtype=dtype) for key in ("num_frames", "height", "width", "ar", "fps")}


@contextlib.contextmanager
def fork_rng(seed):
    """Run a block with a fixed seed and restore the previous random state afterwards, so that evaluation
    neither depends on nor disturbs the training sequence of random numbers."""
    state = paddle.get_rng_state()
    paddle.seed(seed)
    try:
        yield
    finally:
        paddle.set_rng_state(state)


class ExponentialMovingAverage:
    """fp32 shadow copy of the trainable parameters, updated after every optimizer step."""

    def __init__(self, model, decay):
        self.decay = decay
        self.shadow = {
            name: param.detach().astype("float32").clone()
            for name, param in model.named_parameters()
            if not param.stop_gradient
        }

    @paddle.no_grad()
    def update(self, model):
        for name, param in model.named_parameters():
            if name in self.shadow:
                shadow = self.shadow[name]
                shadow.scale_(self.decay)
                shadow.add_(param.detach().astype("float32") * (1.0 - self.decay))

    def export(self, model, directory, save=None):
        """Save `model` with its trainable weights replaced by the averages (by default with save_pretrained)."""
        current = {name: param.detach().clone() for name, param in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            (save or (lambda m, d: m.save_pretrained(d)))(model, directory)
        finally:
            for name, param in model.named_parameters():
                if name in current:
                    param.set_value(current[name])

    def copy_to(self, model):
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.set_value(self.shadow[name].astype(param.dtype))

    def load(self, directory):
        from safetensors.numpy import load_file

        weights = load_file(os.path.join(directory, "model.safetensors"))
        for name in self.shadow:
            self.shadow[name] = paddle.to_tensor(weights[name], dtype="float32")


class EMACallback(TrainerCallback):
    def __init__(self, ema):
        self.ema = ema

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update(unwrap_model(model))


class RestoreRngStateCallback(TrainerCallback):
    """Restore the checkpoint's random state when the first epoch of a resumed run begins.

    paddlenlp 2.8.1 restores it only after skipping the already trained batches of a partly trained epoch, so a
    run resumed from a checkpoint saved at the end of an epoch went on with a fresh random state (other noise,
    timesteps and frame masks) and no longer matched the uninterrupted run.
    """

    def __init__(self, trainer, checkpoint):
        self.trainer = trainer
        self.checkpoint = checkpoint

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.checkpoint is not None:
            self.trainer._load_rng_state(self.checkpoint)
            self.checkpoint = None


class VisualDLCallback(PaddleNLPVisualDLCallback):
    """paddlenlp's VisualDL reporting, with hyper-parameters that VisualDL can store: its HParam record takes
    numbers and strings, and paddlenlp hands it booleans (do_train, fp16, ...), which failed the first step."""

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.vdl_writer is None:
            self._init_summary_writer(args)
        self.vdl_writer.add_text("args", args.to_json_string())
        hparams = {key: str(value) if isinstance(value, bool) else value for key, value in args.to_sanitized_dict().items()}
        self.vdl_writer.add_hparams(hparams, metrics_list=[])


class OpenSoraTrainer(Trainer):
    def __init__(
        self,
        *args,
        vae,
        text_encoder,
        scheduler,
        mask_generator=None,
        train_batch_sampler=None,
        ema=None,
        max_nonfinite_steps=5,
        eval_data_collator=None,
        inference_defaults=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.callback_handler.pop_callback(PaddleNLPVisualDLCallback) is not None:
            self.add_callback(VisualDLCallback)
        self.inference_defaults = inference_defaults
        self.eval_data_collator = eval_data_collator or self.data_collator
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self.mask_generator = mask_generator
        self.train_batch_sampler = train_batch_sampler
        self.ema = ema
        if ema is not None:
            self.add_callback(EMACallback(ema))
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0
        self.skipped_videos = 0

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            self.add_callback(RestoreRngStateCallback(self, resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ------------------------------------------------------------------ data

    def _get_train_sampler(self):
        if self.train_batch_sampler is not None:
            return self.train_batch_sampler
        return super()._get_train_sampler()

    @paddle.no_grad()
    def encode_batch(self, batch):
        """Latents [B, C, T, H, W] and model kwargs (text features, caption mask, size conditions)."""
        if "latent_mean" in batch:  # pre-encoded posterior (dataset/latents.py): draw a fresh sample
            mean = paddle.to_tensor(batch["latent_mean"])
            std = paddle.to_tensor(batch["latent_std"])
            latents = (mean + std * paddle.randn(mean.shape, dtype=mean.dtype)) * self.vae.scaling_factor
        else:
            latents = self.vae.encode(paddle.to_tensor(batch["video"]))
        text = self.text_encoder.encode(list(batch["text"]))
        model_kwargs = dict(y=text["y"], mask=text["mask"], **size_conditions(batch))
        return latents, model_kwargs

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False):
        self.skipped_videos += int(np.sum(np.asarray(inputs.get("num_skipped", 0))))
        latents, model_kwargs = self.encode_batch(inputs)
        frame_mask = None
        if self.mask_generator is not None:
            frame_mask = paddle.to_tensor(self.mask_generator.get_masks(latents.shape[0], latents.shape[2]))
        losses = self.scheduler.training_losses(model, latents, model_kwargs, mask=frame_mask)
        loss = losses["loss"].mean()
        return (loss, losses) if return_outputs else loss

    def create_optimizer(self, lr_scheduler=None):
        optimizer = super().create_optimizer(lr_scheduler)
        # Every path of the Trainer's loop (plain, AMP GradScaler, hybrid parallel) ends in one of these.
        for method_name in ("step", "_step"):
            if hasattr(optimizer, method_name):
                setattr(optimizer, method_name, self._skip_nonfinite(getattr(optimizer, method_name)))
        return optimizer

    def _skip_nonfinite(self, optimizer_step):
        """Wrap an optimizer step so that it is skipped when a gradient is NaN/inf.

        Gradients are already all-reduced here, so every rank takes the same decision. After
        `max_nonfinite_steps` skipped steps in a row training stops with the likely causes.
        """

        def guarded_step(*args, **kwargs):
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads and not bool(paddle.isfinite(paddle.stack([g.astype("float32").square().sum() for g in grads]).sum())):
                self.nonfinite_steps += 1
                logger.warning(f"non-finite gradients at step {self.state.global_step + 1}; skipping the update")
                if self.nonfinite_steps >= self.max_nonfinite_steps:
                    raise UserError(
                        f"training diverged: {self.nonfinite_steps} consecutive steps with a non-finite loss; likely "
                        "causes are fp16 overflow (train with --bf16 True instead) or a learning rate that is too "
                        "high (lower --learning_rate)"
                    )
                return None
            self.nonfinite_steps = 0
            return optimizer_step(*args, **kwargs)

        return guarded_step

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Mean diffusion loss on the held-out set at fixed timesteps and fixed noise (comparable over time)."""
        eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if eval_dataset is None:
            return {}
        model = self.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        num_timesteps = self.scheduler.num_timesteps
        try:
            with fork_rng(self.args.seed), paddle.no_grad():
                for index in range(len(eval_dataset)):
                    batch = self.eval_data_collator([eval_dataset[index]])
                    latents, model_kwargs = self.encode_batch(batch)
                    for fraction in EVAL_TIMESTEP_FRACTIONS:
                        t = paddle.full([latents.shape[0]], int(fraction * num_timesteps), dtype="int64")
                        losses = self.scheduler.training_losses(model, latents, model_kwargs, t=t)
                        total += float(losses["loss"].mean())
                        count += 1
        finally:
            if was_training:
                model.train()
        metrics = {f"{metric_key_prefix}_loss": total / max(count, 1)}
        self.log(metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _save(self, output_dir=None, state_dict=None, merge_tensor_parallel=False):
        super()._save(output_dir, state_dict=state_dict, merge_tensor_parallel=merge_tensor_parallel)
        if self.args.should_save:
            # Also in STDiT2.from_pretrained format, so inference can load a checkpoint directly.
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            self.export(unwrap_model(self.model), output_dir)

    def export(self, model, directory):
        """STDiT2 weights and config, plus the sampling settings it was trained for (inference.json)."""
        model.save_pretrained(directory)
        if self.inference_defaults is not None:
            write_text_atomic(os.path.join(directory, "inference.json"), json.dumps(self.inference_defaults, indent=2) + "\n")

    def _save_checkpoint(self, model, metrics=None):
        super()._save_checkpoint(model, metrics=metrics)
        if not self.args.should_save:
            return
        checkpoint_dir = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        if self.ema is not None:
            self.ema.export(unwrap_model(self.model), os.path.join(checkpoint_dir, EMA_DIR_NAME), self.export)
        # Written last: a checkpoint without it was interrupted while saving and is not resumed from.
        with open(os.path.join(checkpoint_dir, COMPLETE_MARKER), "w") as f:
            f.write(f"{self.state.global_step}\n")
        for path in checkpoints_to_delete(self.args.output_dir, self.args.save_total_limit):
            logger.info(f"Deleting {path} (--save_total_limit {self.args.save_total_limit})")
            shutil.rmtree(path, ignore_errors=True)

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None):
        # paddlenlp 2.8.1 rotates only when local_rank == 0, so never in a single-process run, and before our
        # completion marker exists, so with --save_total_limit 1 a kill right after it could leave no complete
        # checkpoint. _save_checkpoint rotates instead (in the saving process), once the new one is complete.
        pass


def checkpoint_steps(output_dir):
    """Steps of the `checkpoint-N` directories in `output_dir`, ascending."""
    if not os.path.isdir(output_dir):
        return []
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, step = name.partition("-")
        if prefix == "checkpoint" and step.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            steps.append(int(step))
    return sorted(steps)


def is_complete(checkpoint_dir):
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER))


def latest_complete_checkpoint(output_dir):
    """Newest `checkpoint-N` in `output_dir` that finished saving, or None. Torn ones are reported."""
    for step in reversed(checkpoint_steps(output_dir)):
        path = os.path.join(output_dir, f"checkpoint-{step}")
        if is_complete(path):
            return path
        logger.warning(f"{path} is incomplete (interrupted while saving); skipping it")
    return None


def checkpoints_to_delete(output_dir, save_total_limit):
    """Checkpoints older than the newest `save_total_limit` complete ones (torn ones among them too)."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    paths = [os.path.join(output_dir, f"checkpoint-{step}") for step in checkpoint_steps(output_dir)]
    kept = [path for path in paths if is_complete(path)][-save_total_limit:]
    if not kept:
        return []
    return paths[: paths.index(kept[0])]

