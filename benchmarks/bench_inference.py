"""Where the time of a text-to-video run goes: start-up, model loading, text encoding, reference encoding,
sampling (per step, and the share spent outside model forwards), VAE decoding and video writing.

    python benchmarks/bench_inference.py                       # the shipped model at its native size
    python benchmarks/bench_inference.py --repeats 5 --num-frames 16 --height 256 --width 256

Generation runs through `OpenSoraPipeline`, as a Python user would call it. Each figure is the median of
--repeats runs; the table goes to stdout and the JSON to benchmarks/results/.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
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
    parser.add_argument("--model-dir", default=os.path.join(REPO, "assets", "default_model"), help="pipeline directory")
    parser.add_argument("--prompt", default="a red circle moving right on a dark background")
    parser.add_argument("--num-frames", type=int, help="default: the model's")
    parser.add_argument("--height", type=int, help="default: the model's")
    parser.add_argument("--width", type=int, help="default: the model's")
    parser.add_argument("--num-inference-steps", type=int, help="default: the model's")
    parser.add_argument("--with-reference", action="store_true", help="also condition on assets/images/condition/wave.png")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "bench_inference.json"))
    args = parser.parse_args()

    baseline_import = median([import_seconds("import paddle, ppdiffusers") for _ in range(args.repeats)])
    project_import = median([import_seconds("import pipelines") for _ in range(args.repeats)])

    import paddle

    from pipelines import Conditions, OpenSoraPipeline
    from utils.io import write_text_atomic
    from utils.media import save_video
    from utils.runtime import configure_cpu_threads

    conditions = Conditions.image_to_video(os.path.join(REPO, "assets/images/condition/wave.png")) if args.with_reference else None
    call = dict(num_frames=args.num_frames, height=args.height, width=args.width,
                num_inference_steps=args.num_inference_steps, conditions=conditions, seed=0)
    runs = []
    for _ in range(args.repeats):
        timings = {}
        start = time.perf_counter()
        pipe = OpenSoraPipeline.from_pretrained(args.model_dir)
        pipe.set_progress_bar_config(disable=True)
        timings["model_loading"] = time.perf_counter() - start

        # Time each stage inside one real generation by wrapping the calls the pipeline makes.
        stage_seconds = {"text_encoding": [], "reference_encoding": [], "model_forward": [], "vae_decode": []}

        def timed(name, function):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                out = function(*a, **k)
                stage_seconds[name].append(time.perf_counter() - t0)
                return out
            return wrapper

        originals = pipe.text_encoder.forward, pipe.encode_references, pipe.transformer.forward, pipe.vae.decode
        pipe.text_encoder.forward = timed("text_encoding", originals[0])
        pipe.encode_references = timed("reference_encoding", originals[1])
        pipe.transformer.forward = timed("model_forward", originals[2])
        pipe.vae.decode = timed("vae_decode", originals[3])
        start = time.perf_counter()
        output = pipe(args.prompt, **call)
        generation = time.perf_counter() - start
        pipe.text_encoder.forward, pipe.encode_references, pipe.transformer.forward, pipe.vae.decode = originals

        start = time.perf_counter()
        save_video(output.frames[0], output.fps, os.path.join(REPO, "benchmarks", "results", ".bench_inference_sample"), overwrite=True)
        timings["video_writing"] = time.perf_counter() - start
        os.remove(os.path.join(REPO, "benchmarks", "results", ".bench_inference_sample.mp4"))

        timings.update({name: sum(values) for name, values in stage_seconds.items() if name != "model_forward"})
        sampling = generation - timings["text_encoding"] - timings["reference_encoding"] - timings["vae_decode"]
        timings["sampling"] = sampling
        timings["sampling_per_step"] = sampling / pipe.num_timesteps
        timings["model_forward_total"] = sum(stage_seconds["model_forward"])
        timings["sampling_overhead_share"] = max(0.0, sampling - timings["model_forward_total"]) / sampling
        runs.append(timings)

    result = {key: median([run[key] for run in runs]) for key in runs[0]}
    result["import_paddle_ppdiffusers"] = baseline_import
    result["import_project"] = project_import
    result["end_to_end_estimate"] = project_import + sum(result[k] for k in ("model_loading", "text_encoding", "reference_encoding", "sampling", "vae_decode", "video_writing"))
    machine = dict(platform=platform.platform(), cpus=len(os.sched_getaffinity(0)), threads=configure_cpu_threads(), paddle=paddle.__version__)
    settings = dict(**{k: v for k, v in call.items() if k != "conditions"}, steps_taken=pipe.num_timesteps,
                    model=os.path.relpath(args.model_dir, REPO), reference=args.with_reference, defaults=pipe.default_size)
    for key, value in result.items():
        unit = "" if key.endswith("share") else " s"
        print(f"{key:<28}{value:>10.3f}{unit}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; settings {settings}; machine {machine}")
    write_text_atomic(args.output, json.dumps(dict(machine=machine, settings=settings, repeats=args.repeats, median=result, runs=runs), indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
