"""Where the time of a text-to-video run goes: start-up, model loading, text encoding, reference encoding,
sampling (per step, and the share spent outside model forwards), VAE decoding and video writing.

    python benchmarks/bench_inference.py                       # the shipped model at its native size
    python benchmarks/bench_inference.py --repeats 5 -- --num-frames 16 --image-size 256 256

Arguments after `--` are passed to the inference command line (scripts/inference.py flags). Each figure
is the median of --repeats runs; the table goes to stdout and the JSON to benchmarks/results/.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as `python benchmarks/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, REPO)


def import_seconds(statement):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="a red circle moving right on a dark background")
    parser.add_argument("--with-reference", action="store_true", help="also condition on assets/images/condition/wave.png")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "bench_inference.json"))
    parser.add_argument("inference_args", nargs="*", help="extra scripts/inference.py flags (after --)")
    args = parser.parse_args()

    baseline_import = median([import_seconds("import paddle, ppdiffusers") for _ in range(args.repeats)])
    script_import = median([import_seconds("import utils.generation, models.stdit.stdit2, schedulers.rflow, paddlenlp.transformers") for _ in range(args.repeats)])

    import numpy as np
    import paddle

    from utils.config_utils import parse_args
    from utils.generation import generate_videos, load_pipeline, output_path, plan_jobs
    from utils.inference_utils import collect_references, save_sample
    from utils.io import write_text_atomic
    from utils.runtime import configure_cpu_runtime

    threads = configure_cpu_runtime()
    prompt = args.prompt
    if args.with_reference:
        prompt += json.dumps({"reference_path": os.path.join(REPO, "assets/images/condition/wave.png"), "mask_strategy": "0"})
    save_dir = tempfile.mkdtemp(prefix="bench_inference_")
    gen_args = parse_args(["--prompt", prompt, "--quiet", "--save-dir", save_dir, *args.inference_args], "bench")

    runs = []
    for _ in range(args.repeats):
        timings = {}
        start = time.perf_counter()
        pipeline = load_pipeline(gen_args)
        timings["model_loading"] = time.perf_counter() - start

        start = time.perf_counter()
        with paddle.no_grad():
            pipeline.text_encoder.encode([prompt.split("{")[0]])
        timings["text_encoding"] = time.perf_counter() - start

        jobs = plan_jobs(gen_args)
        start = time.perf_counter()
        collect_references([job.reference_path for job in jobs], pipeline.vae, gen_args.image_size)
        timings["reference_encoding"] = time.perf_counter() - start

        # Time the model forwards and the VAE decode inside one real generation.
        forward_seconds, decode_seconds = [], []
        model_forward, vae_decode = pipeline.model.forward, pipeline.vae.decode

        def timed_forward(*a, **k):
            t0 = time.perf_counter()
            out = model_forward(*a, **k)
            forward_seconds.append(time.perf_counter() - t0)
            return out

        def timed_decode(*a, **k):
            t0 = time.perf_counter()
            out = vae_decode(*a, **k)
            decode_seconds.append(time.perf_counter() - t0)
            return out

        pipeline.model.forward, pipeline.vae.decode = timed_forward, timed_decode
        start = time.perf_counter()
        job, sample_k, video = next(generate_videos(gen_args, jobs, pipeline))
        generation = time.perf_counter() - start
        pipeline.model.forward, pipeline.vae.decode = model_forward, vae_decode

        start = time.perf_counter()
        save_sample(video, fps=gen_args.fps // gen_args.frame_interval, save_path=output_path(gen_args, job, sample_k), overwrite=True)
        timings["video_writing"] = time.perf_counter() - start

        sampling = generation - sum(decode_seconds) - timings["reference_encoding"]
        timings["vae_decode"] = sum(decode_seconds)
        timings["sampling"] = sampling
        timings["sampling_per_step"] = sampling / len(forward_seconds)
        timings["model_forward_total"] = sum(forward_seconds)
        timings["sampling_overhead_share"] = max(0.0, sampling - sum(forward_seconds)) / sampling
        runs.append(timings)

    result = {key: median([run[key] for run in runs]) for key in runs[0]}
    result["import_paddle_ppdiffusers"] = baseline_import
    result["import_project"] = script_import
    result["end_to_end_estimate"] = script_import + sum(result[k] for k in ("model_loading", "text_encoding", "reference_encoding", "sampling", "vae_decode", "video_writing"))
    machine = dict(platform=platform.platform(), cpus=len(os.sched_getaffinity(0)), threads=threads, paddle=paddle.__version__)
    settings = dict(num_frames=gen_args.num_frames, image_size=gen_args.image_size, sampler=gen_args.sampler,
                    steps=gen_args.num_sampling_steps, model=os.path.relpath(gen_args.model_path, REPO), reference=args.with_reference)
    for key, value in result.items():
        unit = "" if key.endswith("share") else " s"
        print(f"{key:<28}{value:>10.3f}{unit}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; settings {settings}; machine {machine}")
    write_text_atomic(args.output, json.dumps(dict(machine=machine, settings=settings, repeats=args.repeats, median=result, runs=runs), indent=2) + "\n")
    np.asarray(video)  # keep the last video alive until here for the RSS figure
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
