"""Train STDiT2 (Open-Sora v1.1) or STDiT3 (v1.2) with the paddlenlp Trainer.

Single process:   python scripts/trainer_opensora.py --do_train --output_dir ./exp_output --max_steps 100
Several devices:  python -u -m paddle.distributed.launch --gpus "0,1,2,3" scripts/trainer_opensora.py --do_train ...
On CPU:           python -m paddle.distributed.launch --nproc_per_node 2 scripts/trainer_opensora.py --do_train ...

Run with --help for every argument. Restarting the same command resumes from the newest complete checkpoint
in --output_dir (unless --overwrite_output_dir is given).
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402


def main(argv):
    # Intel OpenMP threads otherwise spin after each parallel region and, once the optimizer has run, slow
    # the next kernels several-fold on a small CPU. Must be set before Paddle is imported.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    import dataclasses
    import json

    from utils.runtime import configure_cpu_runtime, quiet_library_logs

    quiet_library_logs()  # paddlenlp's INFO lines about parsing and loading, unless --verbose

    from paddlenlp.trainer import PdArgumentParser, TrainingArguments, set_seed
    from paddlenlp.utils.log import logger

    from dataset.datasets import VariableVideoTextDataset, collate_batch
    from dataset.latents import LatentTextDataset, collate_latents
    from dataset.sampler import build_batch_sampler
    from models.families import load_transformer, load_vae, transformer_class
    from models.text_encoder.t5 import T5Encoder
    from trainer.mask_generator import MaskGenerator
    from trainer.setup import (
        build_training_scheduler,
        check_compatible,
        check_replicas_agree,
        configure_precision,
        configure_reporting,
        freeze_options,
        pretrained_model_path,
        read_model_source,
        resolve_diffusion_settings,
    )
    from trainer.trainer import EMA_DIR_NAME, ExponentialMovingAverage, OpenSoraTrainer, latest_complete_checkpoint
    from trainer.trainer_args import DataArguments, ModelArguments
    from utils.errors import UserError
    from utils.io import ensure_writable_dir

    parser = PdArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    # ---- every check on the user's input, before any model is loaded
    config, model_defaults = read_model_source(model_args)
    settings = resolve_diffusion_settings(model_args, config, model_defaults)
    check_compatible(config, model_args)
    mask_generator = None
    if model_args.mask_ratios != "none":
        try:
            ratios = json.loads(model_args.mask_ratios) if model_args.mask_ratios else None
        except json.JSONDecodeError as error:
            raise UserError(f"--mask_ratios: not valid JSON ({error})") from None
        if ratios is not None and not isinstance(ratios, dict):
            raise UserError('--mask_ratios must be a JSON object of probabilities, e.g. \'{"mask_no": 1.0}\'')
        try:
            mask_generator = MaskGenerator(ratios)
        except ValueError as error:
            raise UserError(f"--mask_ratios: {error}") from None

    def video_dataset(data_path, max_samples=None):
        return VariableVideoTextDataset(
            data_path,
            frame_interval=data_args.frame_interval,
            transform_name=data_args.transform_name,
            num_frames=data_args.num_frames,
            image_size=tuple(data_args.image_size),
            max_samples=max_samples,
            seed=training_args.seed,
        )

    if data_args.latent_data_path:
        train_dataset = LatentTextDataset(data_args.latent_data_path)
        collate = collate_latents
        bucket_config = None  # latents have one size
    else:
        train_dataset = video_dataset(data_args.data_path)
        collate = collate_batch
        bucket_config = data_args.bucket_config
    batch_sampler = build_batch_sampler(
        train_dataset,
        bucket_config=bucket_config,
        batch_size=training_args.per_device_train_batch_size,
        num_replicas=training_args.dataset_world_size,
        rank=training_args.dataset_rank,
        seed=training_args.seed,
    )
    eval_dataset = None
    if data_args.eval_data_path:
        eval_dataset = video_dataset(data_args.eval_data_path, max_samples=data_args.eval_max_samples)
    configure_reporting(training_args)
    ensure_writable_dir(training_args.output_dir, "--output_dir")
    configure_precision(training_args)
    configure_cpu_runtime()
    set_seed(training_args.seed)

    # ---- frozen encoders and the STDiT2/STDiT3 to train
    vae = load_vae(model_args.vae_path, micro_batch_size=model_args.vae_micro_batch_size or None)
    overrides = dict(gradient_checkpointing=model_args.gradient_checkpointing, **freeze_options(config, model_args.freeze))
    if model_args.model_config:
        model = transformer_class(config)(dataclasses.replace(config, **overrides))
    else:
        model = load_transformer(pretrained_model_path(model_args), **overrides)
    text_encoder = T5Encoder.from_pretrained(model_args.text_encoder_path, model_max_length=config.model_max_length)
    scheduler = build_training_scheduler(settings, model_args.rflow_sample_method, vae)

    ema = ExponentialMovingAverage(model, model_args.ema_decay) if model_args.ema_decay > 0 else None
    first = train_dataset.rows[0]
    inference_defaults = dict(
        num_frames=int(first["num_frames"]) if data_args.latent_data_path else data_args.num_frames,
        image_size=[int(first["height"]), int(first["width"])] if data_args.latent_data_path else list(data_args.image_size),
        fps=int(round(float(first["fps"]))),
        frame_interval=data_args.frame_interval,
        sampler=settings.sampler,
        num_sampling_steps=30 if settings.sampler == "rflow" else 100,
        cfg_scale=settings.cfg_scale,
    )
    if settings.use_timestep_transform:
        inference_defaults.update(use_timestep_transform=True, transform_scale=settings.transform_scale)
    # The training loop reports its progress and losses through paddlenlp's logger, at INFO.
    logger.set_level("INFO")
    trainer = OpenSoraTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate,
        eval_data_collator=collate_batch,
        vae=vae,
        text_encoder=text_encoder,
        scheduler=scheduler,
        mask_generator=mask_generator,
        train_batch_sampler=batch_sampler,
        ema=ema,
        max_nonfinite_steps=model_args.max_nonfinite_steps,
        inference_defaults=inference_defaults,
    )

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and not training_args.overwrite_output_dir:
        checkpoint = latest_complete_checkpoint(training_args.output_dir)
    if checkpoint is not None:
        logger.info(f"resuming from {checkpoint}")
        if ema is not None and os.path.isdir(os.path.join(checkpoint, EMA_DIR_NAME)):
            ema.load(os.path.join(checkpoint, EMA_DIR_NAME))

    if training_args.do_train:
        trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        if ema is not None and training_args.should_save:
            ema.export(model, os.path.join(training_args.output_dir, EMA_DIR_NAME), trainer.export)
        if training_args.world_size > 1:
            check_replicas_agree(model)
        if trainer.skipped_videos:
            logger.warning(f"{trainer.skipped_videos} unreadable videos were skipped during training")


if __name__ == "__main__":
    run_cli(main)
