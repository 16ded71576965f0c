"""Fidelity and speed of DPM-Solver++ against IDDPM on a model of the toy world trained with IDDPM.

    python benchmarks/bench_dpm_solver.py --model-dir PIPELINE_DIR [--num-prompts 48] [--steps 10 15 20 25]

Every sampler generates the same prompts from the same seeds (so the same starting noise): IDDPM with 100
steps (the reference), IDDPM respaced to each of --steps, DPM-Solver++(2M) with each of --steps (evenly spaced
log-SNR), and at the middle step count DDIM (DPM-Solver++ of first order) and DPM-Solver++ on evenly spaced
timesteps; DPM-Solver++ with 100 steps stands for the exact probability-flow ODE solution (on Gaussian data
its error there is about 0.1% of the data's spread, tests/schedulers/test_dpm_solver.py). Per sampler: the
strict judges of toy_world/evaluation.py (colour, direction; lenient in brackets), PSNR of each video against
the 100-step IDDPM video and against the ODE solution for the same seed (medians), and seconds per video
(the whole pipeline call). The
frame masks are measured on the first clips of the toy world as evaluate.py draws them: image condition
(does the object then move as captioned; PSNR of the given frame against the VAE's reconstruction) and edit
0.5 (mean absolute change from the reference video). The table goes to stdout, the JSON to --output.
"""

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as `python benchmarks/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, REPO)


def samplers(steps, cfg_scale, cfg_channel):
    from schedulers.dpm_solver import DPMSolver
    from schedulers.iddpm import IDDPM

    common = dict(cfg_scale=cfg_scale, cfg_channel=cfg_channel)
    middle = steps[len(steps) // 2]
    table = {"iddpm-100": IDDPM(num_sampling_steps=100, **common), "ode-100": DPMSolver(100, **common)}
    for n in steps:
        table[f"iddpm-{n}"] = IDDPM(num_sampling_steps=n, **common)
        table[f"dpm-solver++-{n}"] = DPMSolver(n, **common)
    table[f"ddim-{middle}"] = DPMSolver(middle, solver_order=1, **common)
    table[f"dpm-solver++-{middle}-time-uniform"] = DPMSolver(middle, timestep_spacing="time_uniform", **common)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="pipeline directory of a model trained with IDDPM")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--num-condition-clips", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 15, 20, 25])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "bench_dpm_solver.json"))
    args = parser.parse_args()

    import paddle

    from pipelines import Conditions, OpenSoraPipeline
    from schedulers.iddpm import IDDPM
    from toy_world import evaluation, synthetic
    from utils.io import write_text_atomic
    from utils.runtime import quiet_library_logs

    quiet_library_logs()
    pipe = OpenSoraPipeline.from_pretrained(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    if not isinstance(pipe.scheduler, IDDPM):
        raise SystemExit(f"{args.model_dir}: its scheduler is {type(pipe.scheduler).__name__}, not IDDPM")
    num_frames, height, width = (pipe.default_size[key] for key in ("num_frames", "height", "width"))
    table = samplers(sorted(args.steps), pipe.scheduler.cfg_scale, pipe.scheduler.cfg_channel)

    rng = np.random.default_rng(args.seed)
    seen = synthetic.seen_combinations()
    picks = [seen[i] for i in rng.permutation(len(seen))[: args.num_prompts]]
    clips = [synthetic.sample_clip(rng, combo, height, width) for combo in picks]
    templates, verbs = synthetic.long_templates(), synthetic.MOTION_VERBS
    prompts = [synthetic.caption(c["colour"], c["shape"], c["direction"], c["background"],
                                 templates[rng.integers(len(templates))], verbs[rng.integers(len(verbs))]) for c in clips]
    conditioned = clips[: args.num_condition_clips]
    rendered = [synthetic.render_clip(clip, num_frames, height, width) for clip in conditioned]

    def generate(scheduler, texts, conditions=None):
        """Frames [T, H, W, 3] in [0, 255] per prompt and the seconds per video of the pipeline calls."""
        pipe.scheduler = scheduler
        conditions = conditions or [None] * len(texts)
        videos, seconds = [], 0.0
        for start in range(0, len(texts), args.batch_size):
            t0 = time.perf_counter()
            output = pipe(texts[start : start + args.batch_size], conditions=conditions[start : start + args.batch_size],
                          num_inference_steps=scheduler.num_inference_steps, seed=args.seed + start)
            seconds += time.perf_counter() - t0
            videos += list(output.frames.astype(np.float32))
        return videos, seconds / len(texts)

    def reconstruct(frames):
        x = paddle.to_tensor(frames.transpose(3, 0, 1, 2)[None].astype(np.float32) / 127.5 - 1.0)
        return evaluation.to_frames(pipe.vae.decode(pipe.vae.encode(x, sample_posterior=False))[0].numpy())

    def share(judge, generated, truth, key):
        """The share of the videos whose `judge(video, truth[key])` holds."""
        return float(np.mean([judge(video, clip[key]) for video, clip in zip(generated, truth)]))

    def names(generated, truth, key, lenient_judge):
        return share(lambda video, expected: lenient_judge(video) == expected, generated, truth, key)

    videos, results = {}, {}
    for name, scheduler in table.items():
        videos[name], seconds = generate(scheduler, prompts)
        results[name] = dict(
            model_calls=scheduler.num_inference_steps,
            seconds_per_video=seconds,
            colour=share(evaluation.colour_matches, videos[name], clips, "colour"),
            direction=share(evaluation.direction_matches, videos[name], clips, "direction"),
            lenient_colour=names(videos[name], clips, "colour", evaluation.dominant_colour),
            lenient_direction=names(videos[name], clips, "direction", evaluation.motion_direction),
        )
        print(f"{name}: {results[name]}", flush=True)
    for name in table:
        for reference in ("iddpm-100", "ode-100"):
            values = [evaluation.psnr(a, b) for a, b in zip(videos[name], videos[reference])]
            results[name][f"psnr_vs_{reference}"] = float(np.median(values)) if name != reference else None

    # frame masks, on the reference sampler and DPM-Solver++ at the largest and middle step counts
    middle = sorted(args.steps)[len(args.steps) // 2]
    masked = dict.fromkeys(["iddpm-100", f"dpm-solver++-{max(args.steps)}", f"dpm-solver++-{middle}"])
    texts = prompts[: len(conditioned)]
    recon_first = [reconstruct(frames[:1])[0] for frames in rendered]
    recon_all = [reconstruct(frames) for frames in rendered]
    for name in masked:
        image, _ = generate(table[name], texts, [Conditions.image_to_video(frames[0]) for frames in rendered])
        edit, _ = generate(table[name], texts, [Conditions.edit(frames, edit_ratio=0.5) for frames in rendered])
        results[name]["image_condition"] = dict(
            direction=share(evaluation.direction_matches, image, conditioned, "direction"),
            psnr_given_frame=float(np.mean([evaluation.psnr(v[0], r) for v, r in zip(image, recon_first)])),
        )
        change = float(np.mean([evaluation.mean_abs_change(v, r) for v, r in zip(edit, recon_all)]))
        results[name]["edit_0.5_mean_abs_change"] = change
        print(f"{name} masks: {results[name]['image_condition']}, edit {change:.2f}", flush=True)

    print(f"\n{'sampler':34} {'calls':>5} {'s/video':>8} {'colour':>15} {'direction':>15} {'PSNR/iddpm100':>13} {'PSNR/ode':>9}")
    for name, row in results.items():
        colour, direction = (f"{100 * row[key]:.1f}% ({100 * row['lenient_' + key]:.0f}%)" for key in ("colour", "direction"))
        psnrs = ["-" if row[key] is None else f"{row[key]:.1f}" for key in ("psnr_vs_iddpm-100", "psnr_vs_ode-100")]
        print(f"{name:34} {row['model_calls']:>5} {row['seconds_per_video']:>8.2f} {colour:>15} {direction:>15} "
              f"{psnrs[0]:>13} {psnrs[1]:>9}")
    report = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     date=datetime.now(UTC).isoformat(timespec="seconds"), paddle=paddle.__version__),
        model_dir=os.path.abspath(args.model_dir), num_prompts=len(prompts), seed=args.seed, prompts=prompts,
        note="PSNRs are medians over the videos; accuracies are shares of the prompts (strict judges; lenient_*)",
        results=results,
    )
    write_text_atomic(args.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
