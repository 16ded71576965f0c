"""Evaluate a model of the toy world (dataset/synthetic.py) on its decoded frames.

    python scripts/evaluate.py                        # the shipped model, table on stdout
    python scripts/evaluate.py --output eval.json --num-prompts 24

Measures: colour and direction accuracy of text-to-video for seen and held-out colour x shape x direction
combinations; image condition (PSNR of the conditioned frame and of the next one against the VAE
reconstruction of the reference image, and how often the object then moves as captioned); connect (first
and last frame against their references); extend (the conditioned frames against the reference video's
frames); edit (how much the frames change for several edit ratios).
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402

EDIT_RATIOS = (0.2, 0.5, 0.8)


def main(argv):
    import argparse
    import json
    import tempfile

    import numpy as np
    from PIL import Image

    from dataset import synthetic
    from utils import evaluation
    from utils.config_utils import parse_args
    from utils.errors import UserError
    from utils.generation import generate_videos, load_pipeline, plan_jobs
    from utils.inference_utils import read_from_path
    from utils.io import atomic_path, write_text_atomic
    from utils.runtime import configure_cpu_runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="STDiT2 directory (default: the shipped model)")
    parser.add_argument("--vae-path")
    parser.add_argument("--text-encoder-path")
    parser.add_argument("--num-prompts", type=int, default=24, help="prompts per text-to-video group and clips per conditioning task")
    parser.add_argument("--num-sampling-steps", type=int, help="default: what the model was trained with")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--strips-dir", help="also save one PNG strip (every other frame) of the first video of each task here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.num_prompts < 1:
        raise UserError(f"--num-prompts must be a positive integer, got {args.num_prompts}")
    configure_cpu_runtime()

    base_argv = ["--seed", str(args.seed), "--batch-size", str(args.batch_size), "--quiet"]
    for flag in ("model_path", "vae_path", "text_encoder_path", "num_sampling_steps"):
        if getattr(args, flag) is not None:
            base_argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    settings = parse_args(base_argv + ["--prompt", "probe"], "evaluate")
    pipeline = load_pipeline(settings)
    num_frames, (height, width) = settings.num_frames, settings.image_size
    rng = np.random.default_rng(args.seed)

    def generate(prompts):
        gen_args = parse_args(base_argv + ["--prompt", *prompts], "evaluate")
        return [evaluation.to_frames(video) for _, _, video in generate_videos(gen_args, plan_jobs(gen_args), pipeline)]

    def reconstruct(path):
        """The VAE's reconstruction (posterior mean) of a reference, as frames in [0, 255]."""
        import paddle

        x = paddle.to_tensor(read_from_path(path, (height, width)))[None]
        latents = pipeline.vae.encode(x, sample_posterior=False)
        return evaluation.to_frames(pipeline.vae.decode(latents)[0].numpy())

    def captions_for(combinations):
        return [random_clip(combo)[1] for combo in combinations]

    def random_clip(combination):
        clip = synthetic.sample_clip(rng, combination, height, width)
        return clip, synthetic.caption(clip["colour"], clip["shape"], clip["direction"], clip["background"])

    results = {}

    def save_strip(name, video, caption_text):
        if not args.strips_dir:
            return
        strip = np.concatenate(list(video[::2].clip(0, 255).astype(np.uint8)), axis=1)
        with atomic_path(os.path.join(args.strips_dir, f"{name}.png")) as tmp:
            Image.fromarray(strip).save(tmp, format="PNG")
        captions[name] = caption_text.split("{")[0]  # the text, without the temporary reference paths

    captions = {}
    # ---- text to video: colour and direction
    for group, combinations in (("seen", synthetic.seen_combinations()), ("held_out", list(synthetic.HELD_OUT_COMBINATIONS))):
        picks = [combinations[i] for i in rng.permutation(len(combinations))[: args.num_prompts]]
        prompts = captions_for(picks)
        videos = generate(prompts)
        save_strip(f"t2v_{group}", videos[0], prompts[0])
        measured = [dict(prompt=p, colour=evaluation.dominant_colour(v), direction=evaluation.motion_direction(v)) for p, v in zip(prompts, videos)]
        colour_hits = [m["colour"] == combo[0] for m, combo in zip(measured, picks)]
        direction_hits = [m["direction"] == combo[2] for m, combo in zip(measured, picks)]
        results[f"t2v_{group}"] = dict(
            prompts=len(picks), colour_accuracy=float(np.mean(colour_hits)), direction_accuracy=float(np.mean(direction_hits)),
            samples=measured,
        )

    with tempfile.TemporaryDirectory() as workdir:
        clips = [random_clip(synthetic.seen_combinations()[i]) for i in rng.permutation(len(synthetic.seen_combinations()))[: args.num_prompts]]
        rendered = [synthetic.render_clip(clip, num_frames, height, width) for clip, _ in clips]

        def write_png(frame, name):
            path = os.path.join(workdir, name)
            Image.fromarray(frame).save(path)
            return path

        def write_mp4(frames, name):
            path = os.path.join(workdir, name)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(synthetic.encode_mp4(frames, settings.fps))
            return path

        # ---- image condition: frame 0 given
        prompts, refs = [], []
        for i, ((_, text), frames) in enumerate(zip(clips, rendered)):
            refs.append(write_png(frames[0], f"first{i}.png"))
            prompts.append(text + json.dumps({"reference_path": refs[-1], "mask_strategy": "0"}))
        videos = generate(prompts)
        save_strip("image_condition", videos[0], prompts[0])
        recon = [reconstruct(path)[0] for path in refs]
        # The start position says nothing about the direction (see synthetic.sample_clip): the caption decides it.
        directions = [evaluation.motion_direction(v) for v in videos]
        results["image_condition"] = dict(
            psnr_conditioned_frame=float(np.mean([evaluation.psnr(v[0], r) for v, r in zip(videos, recon)])),
            psnr_next_frame=float(np.mean([evaluation.psnr(v[1], r) for v, r in zip(videos, recon)])),
            direction_accuracy=float(np.mean([d == clip["direction"] for d, (clip, _) in zip(directions, clips)])),
            samples=[dict(prompt=text, direction=d) for d, (_, text) in zip(directions, clips)],
        )

        # ---- connect: first and last frames given
        prompts, pairs = [], []
        for i, ((_, text), frames) in enumerate(zip(clips, rendered)):
            pair = (write_png(frames[0], f"a{i}.png"), write_png(frames[-1], f"b{i}.png"))
            pairs.append(pair)
            prompts.append(text + json.dumps({"reference_path": ";".join(pair), "mask_strategy": "0;0,1,0,-1,1"}))
        videos = generate(prompts)
        save_strip("connect", videos[0], prompts[0])
        results["connect"] = dict(
            psnr_first_frame=float(np.mean([evaluation.psnr(v[0], reconstruct(p[0])[0]) for v, p in zip(videos, pairs)])),
            psnr_last_frame=float(np.mean([evaluation.psnr(v[-1], reconstruct(p[1])[0]) for v, p in zip(videos, pairs)])),
        )

        # ---- extend: the second half of a video becomes the first half of the new clip
        given = num_frames // 2
        prompts, sources = [], []
        for i, ((_, text), frames) in enumerate(zip(clips, rendered)):
            sources.append(write_mp4(frames, f"video{i}.mp4"))
            # the reference's last `given` frames open the new clip, which continues them
            prompts.append(text + json.dumps({"reference_path": sources[-1], "mask_strategy": f"0,0,-{given},0,{given}"}))
        videos = generate(prompts)
        save_strip("extend", videos[0], prompts[0])
        results["extend"] = dict(
            conditioned_frames=given,
            psnr_conditioned_frames=float(np.mean([evaluation.psnr(v[:given], reconstruct(s)[-given:]) for v, s in zip(videos, sources)])),
        )

        # ---- edit: all frames given, re-noised to the edit ratio
        changes = {}
        for ratio in EDIT_RATIOS:
            prompts = [text + json.dumps({"reference_path": s, "mask_strategy": f"0,0,0,0,{num_frames},{ratio}"}) for (_, text), s in zip(clips, sources)]
            videos = generate(prompts)
            save_strip(f"edit_{ratio}", videos[0], prompts[0])
            changes[str(ratio)] = float(np.mean([evaluation.mean_abs_change(v, reconstruct(s)) for v, s in zip(videos, sources)]))
        values = [changes[str(r)] for r in EDIT_RATIOS]
        results["edit"] = dict(mean_abs_change=changes, increases_with_ratio=bool(np.all(np.diff(values) > 0)))

    print_table(results)
    if args.strips_dir:
        write_text_atomic(os.path.join(args.strips_dir, "captions.json"), json.dumps(captions, indent=2) + "\n")
    if args.output:
        write_text_atomic(args.output, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")


def print_table(results):
    print(f"{'measurement':<45}{'value':>10}")
    for task, values in results.items():
        for name, value in values.items():
            if isinstance(value, list):  # per-prompt details: JSON only
                continue
            if isinstance(value, dict):
                for key, item in value.items():
                    print(f"{task + '.' + name + '[' + key + ']':<45}{item:>10.3f}")
            else:
                print(f"{task + '.' + name:<45}{value:>10.3f}" if isinstance(value, float) else f"{task + '.' + name:<45}{str(value):>10}")


if __name__ == "__main__":
    run_cli(main)
