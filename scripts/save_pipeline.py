"""Assemble a pipeline directory (what `OpenSoraPipeline.from_pretrained` and `scripts/app.py` load) from a
trained or converted STDiT2 and the VAE and T5 encoder it was trained with.

    python scripts/save_pipeline.py --model-path outputs/checkpoint-2000 --vae-path assets/default_model/vae \
        --text-encoder-path assets/default_model/text_encoder --output-dir my_pipeline

The sampling settings and the size the model was trained for come from the STDiT2 directory's
inference.json (written by scripts/trainer_opensora.py); models without one get Open-Sora v1.1's defaults,
and any of them can be set with the flags below. The output directory is written whole or not at all.
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402


def main(argv):
    import argparse

    from pipelines.open_sora.settings import build_scheduler, family_defaults, read_model_defaults
    from utils.errors import UserError
    from utils.runtime import quiet_library_logs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="STDiT2 or STDiT3 directory (config.json, model.safetensors)")
    parser.add_argument("--vae-path", required=True, help="ppdiffusers AutoencoderKL or v1.2 video VAE directory")
    parser.add_argument("--text-encoder-path", required=True, help="paddlenlp T5 directory with its tokenizer")
    parser.add_argument("--output-dir", required=True, help="the pipeline directory to write (replaced if it exists)")
    parser.add_argument("--sampler", choices=["iddpm", "rflow"])
    parser.add_argument("--num-sampling-steps", type=int)
    parser.add_argument("--cfg-scale", type=float)
    args = parser.parse_args(argv)
    if os.path.isfile(args.output_dir):
        raise UserError(f"--output-dir {args.output_dir}: is a file; give a directory path")
    quiet_library_logs()

    from pipelines import OpenSoraPipeline

    settings = {**family_defaults(args.model_path), **read_model_defaults(args.model_path)}
    settings.update({key: value for key, value in vars(args).items() if key in settings and value is not None})
    height, width = settings["image_size"]
    pipe = OpenSoraPipeline.from_component_paths(
        args.model_path, args.vae_path, args.text_encoder_path, build_scheduler(settings),
        trained_size=dict(num_frames=settings["num_frames"], height=height, width=width, fps=settings["fps"],
                          frame_interval=settings["frame_interval"]),
    )
    if settings["sampler"] == "iddpm" and not pipe.transformer.config.pred_sigma:
        raise UserError(f"{args.model_path}: --sampler iddpm needs a model that predicts sigma; use --sampler rflow")
    pipe.save_pretrained(args.output_dir)
    print(args.output_dir)


if __name__ == "__main__":
    run_cli(main)
