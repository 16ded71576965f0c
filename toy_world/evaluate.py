"""Evaluate a model of the toy world (toy_world/synthetic.py) on its decoded frames.

    python toy_world/evaluate.py                        # the shipped model, table on stdout
    python toy_world/evaluate.py --output eval.json --num-prompts 48 --model-dir assets/default_model

Measures: colour and direction accuracy of text-to-video for seen and held-out colour x shape x direction
combinations, on one prompt set per --seeds entry. Every combination drawn is prompted twice, once with the
background phrase ("a red circle moving right on a dark background", or another word order) and once short
("red circle heading right"). Accuracies are those of the strict judge of toy_world/evaluation.py (hue and
saturation; travel along the prompted axis), with the lenient judge's beside them. Then, on the first
seed: image condition (PSNR of the conditioned frame and of the next one against the VAE
reconstruction of the reference image, and how often the object then moves as captioned); connect (first
and last frame against their references); extend (the conditioned frames against the reference video's
frames); edit (how much the frames change for several edit ratios).
"""

import os
import sys

import numpy as np

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import run_cli  # noqa: E402

EDIT_RATIOS = (0.2, 0.5, 0.8)


def main(argv):
    import argparse
    import json

    import paddle
    from PIL import Image

    from toy_world import synthetic
    from pipelines import Conditions, OpenSoraPipeline
    from pipelines.open_sora.settings import DEFAULT_MODEL_DIR
    from toy_world import evaluation
    from utils.errors import UserError
    from utils.io import atomic_path, write_text_atomic
    from utils.runtime import quiet_library_logs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, help="pipeline directory (default: the shipped model)")
    parser.add_argument("--num-prompts", type=int, default=24, help="prompts per text-to-video group and clips per conditioning task")
    parser.add_argument("--num-sampling-steps", type=int, help="default: what the model was trained with")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1234, 5, 11],
        help="one text-to-video prompt set (prompts and sampling noise) per seed; the first also seeds the conditioning tasks",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--strips-dir", help="also save one PNG strip (every other frame) of the first video of each task here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.batch_size < 1:
        raise UserError(f"--num-prompts {args.num_prompts} --batch-size {args.batch_size}: both must be positive")
    quiet_library_logs()
    pipe = OpenSoraPipeline.from_pretrained(args.model_dir)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    num_frames, height, width = (pipe.default_size[key] for key in ("num_frames", "height", "width"))

    def generate(prompts, conditions=None, seed=args.seeds[0]):
        """Float frames [T, H, W, 3] in [0, 255] per prompt; batch b is seeded with seed + its first index, as
        scripts/inference.py seeds its batches."""
        conditions = conditions or [None] * len(prompts)
        videos = []
        for start in range(0, len(prompts), args.batch_size):
            output = pipe(prompts[start : start + args.batch_size], conditions=conditions[start : start + args.batch_size],
                          num_inference_steps=args.num_sampling_steps, seed=seed + start)
            videos += list(output.frames.astype(np.float32))
        return videos

    def reconstruct(frames):
        """The VAE's reconstruction (posterior mean) of uint8 frames [T, H, W, 3], as frames in [0, 255]."""
        x = paddle.to_tensor(frames.transpose(3, 0, 1, 2)[None].astype(np.float32) / 127.5 - 1.0)
        latents = pipe.vae.encode(x, sample_posterior=False)
        return evaluation.to_frames(pipe.vae.decode(latents)[0].numpy())

    def random_clip(rng, combination, templates=synthetic.CAPTION_TEMPLATES[:1], verbs=("moving",)):
        """A clip's random parameters and its caption in one of `templates` with one of `verbs`."""
        clip = synthetic.sample_clip(rng, combination, height, width)
        template, verb = templates[rng.integers(len(templates))], verbs[rng.integers(len(verbs))]
        return clip, synthetic.caption(clip["colour"], clip["shape"], clip["direction"], clip["background"], template, verb)

    results = {}

    def save_strip(name, video, caption_text):
        if not args.strips_dir:
            return
        strip = np.concatenate(list(video[::2].clip(0, 255).astype(np.uint8)), axis=1)
        with atomic_path(os.path.join(args.strips_dir, f"{name}.png")) as tmp:
            Image.fromarray(strip).save(tmp, format="PNG")
        captions[name] = caption_text

    captions = {}
    # ---- text to video: colour and direction, strict and lenient, per prompt set, group and prompt length
    prompt_kinds = {"long": synthetic.long_templates(), "short": synthetic.short_templates()}
    groups = {"seen": synthetic.seen_combinations(), "held_out": list(synthetic.HELD_OUT_COMBINATIONS)}
    per_set = {}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        for group, combinations in groups.items():
            picks = [combinations[i] for i in rng.permutation(len(combinations))[: args.num_prompts]]
            for kind, templates in prompt_kinds.items():
                prompts = [random_clip(rng, combo, templates, synthetic.MOTION_VERBS)[1] for combo in picks]
                videos = generate(prompts, seed=seed)
                if seed == args.seeds[0]:
                    save_strip(f"t2v_{group}" if kind == "long" else f"t2v_{group}_short", videos[0], prompts[0])
                samples = [
                    dict(
                        prompt=prompt,
                        colour_correct=evaluation.colour_matches(video, combo[0]),
                        direction_correct=evaluation.direction_matches(video, combo[2]),
                        **evaluation.describe(video),
                    )
                    for prompt, video, combo in zip(prompts, videos, picks)
                ]
                for sample, combo in zip(samples, picks):
                    sample["lenient_colour_correct"] = sample["lenient_colour"] == combo[0]
                    sample["lenient_direction_correct"] = sample["lenient_direction"] == combo[2]
                per_set[f"seed {seed}, {group}, {kind}"] = dict(seed=seed, group=group, kind=kind, samples=samples)
    results["t2v"] = {}
    for group in groups:
        for kind in prompt_kinds:
            entries = [entry for entry in per_set.values() if entry["group"] == group and entry["kind"] == kind]
            pooled = [sample for entry in entries for sample in entry["samples"]]
            results["t2v"][f"{group}_{kind}"] = dict(
                prompts=len(pooled),
                **accuracies(pooled),
                per_seed={str(entry["seed"]): accuracies(entry["samples"]) for entry in entries},
            )
    results["t2v_samples"] = per_set

    rng = np.random.default_rng([args.seeds[0], 1])
    seen = synthetic.seen_combinations()
    clips = [random_clip(rng, seen[i]) for i in rng.permutation(len(seen))[: args.num_prompts]]
    texts = [text for _, text in clips]
    rendered = [synthetic.render_clip(clip, num_frames, height, width) for clip, _ in clips]

    # ---- image condition: frame 0 given
    videos = generate(texts, [Conditions.image_to_video(frames[0]) for frames in rendered])
    save_strip("image_condition", videos[0], texts[0])
    recon = [reconstruct(frames[:1])[0] for frames in rendered]
    # The start position says nothing about the direction (see synthetic.sample_clip): the caption decides it.
    follows = [evaluation.direction_matches(v, clip["direction"]) for v, (clip, _) in zip(videos, clips)]
    lenient = [evaluation.motion_direction(v) for v in videos]
    results["image_condition"] = dict(
        psnr_conditioned_frame=float(np.mean([evaluation.psnr(v[0], r) for v, r in zip(videos, recon)])),
        psnr_next_frame=float(np.mean([evaluation.psnr(v[1], r) for v, r in zip(videos, recon)])),
        # Against the given frame itself: a VAE that shifts colours still scores high against its own output.
        psnr_conditioned_frame_vs_reference=float(np.mean([evaluation.psnr(v[0], f[0]) for v, f in zip(videos, rendered)])),
        direction_accuracy=float(np.mean(follows)),
        lenient_direction_accuracy=float(np.mean([d == clip["direction"] for d, (clip, _) in zip(lenient, clips)])),
        samples=[dict(prompt=text, direction_correct=f, lenient_direction=d) for f, d, text in zip(follows, lenient, texts)],
    )

    # ---- connect: first and last frames given
    videos = generate(texts, [Conditions.connect(frames[0], frames[-1]) for frames in rendered])
    save_strip("connect", videos[0], texts[0])
    results["connect"] = dict(
        psnr_first_frame=float(np.mean([evaluation.psnr(v[0], reconstruct(f[:1])[0]) for v, f in zip(videos, rendered)])),
        psnr_last_frame=float(np.mean([evaluation.psnr(v[-1], reconstruct(f[-1:])[0]) for v, f in zip(videos, rendered)])),
        psnr_first_frame_vs_reference=float(np.mean([evaluation.psnr(v[0], f[0]) for v, f in zip(videos, rendered)])),
        psnr_last_frame_vs_reference=float(np.mean([evaluation.psnr(v[-1], f[-1]) for v, f in zip(videos, rendered)])),
    )

    # ---- extend: the second half of a video becomes the first half of the new clip, which continues it
    given = num_frames // 2
    videos = generate(texts, [Conditions.extend(frames, num_frames=given) for frames in rendered])
    save_strip("extend", videos[0], texts[0])
    results["extend"] = dict(
        conditioned_frames=given,
        psnr_conditioned_frames=float(np.mean([evaluation.psnr(v[:given], reconstruct(f)[-given:]) for v, f in zip(videos, rendered)])),
        psnr_conditioned_frames_vs_reference=float(np.mean([evaluation.psnr(v[:given], f[-given:]) for v, f in zip(videos, rendered)])),
    )

    # ---- edit: all frames given, re-noised to the edit ratio
    changes = {}
    for ratio in EDIT_RATIOS:
        videos = generate(texts, [Conditions.edit(frames, edit_ratio=ratio) for frames in rendered])
        save_strip(f"edit_{ratio}", videos[0], texts[0])
        changes[str(ratio)] = float(np.mean([evaluation.mean_abs_change(v, reconstruct(f)) for v, f in zip(videos, rendered)]))
    values = [changes[str(r)] for r in EDIT_RATIOS]
    results["edit"] = dict(mean_abs_change=changes, increases_with_ratio=bool(np.all(np.diff(values) > 0)))

    print_table(results)
    if args.strips_dir:
        write_text_atomic(os.path.join(args.strips_dir, "captions.json"), json.dumps(captions, indent=2) + "\n")
    if args.output:
        write_text_atomic(args.output, json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")


def accuracies(samples):
    """Strict accuracies first, then the lenient ones, over a list of per-prompt records."""
    return {
        name: float(np.mean([sample[key] for sample in samples]))
        for name, key in (
            ("colour_accuracy", "colour_correct"),
            ("direction_accuracy", "direction_correct"),
            ("lenient_colour_accuracy", "lenient_colour_correct"),
            ("lenient_direction_accuracy", "lenient_direction_correct"),
        )
    }


def print_table(results):
    print(f"{'text to video (strict; lenient)':<24}{'colour':>16}{'direction':>16}   per seed: direction")
    for name, values in results["t2v"].items():
        per_seed = " ".join(f"{seed}: {a['direction_accuracy']:.1%}" for seed, a in values["per_seed"].items())
        print(
            f"{name + ' (' + str(values['prompts']) + ')':<24}"
            f"{values['colour_accuracy']:>7.1%}; {values['lenient_colour_accuracy']:>6.1%}"
            f"{values['direction_accuracy']:>7.1%}; {values['lenient_direction_accuracy']:>6.1%}   {per_seed}"
        )
    print(f"{'measurement':<45}{'value':>10}")
    for task, values in results.items():
        if task.startswith("t2v"):
            continue
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
