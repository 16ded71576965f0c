"""STDiT2 forward time in a user's own program that only imports the model, against the scripts' set-up.

    python benchmarks/bench_bare_import.py            # table on stdout, JSON in benchmarks/results/

Each case runs in a fresh process (the runtime settings are process-wide and must precede MKL's first call):
- bare import: `from models.stdit.stdit2 import STDiT2`, nothing else (importing `models` applies the set-up);
- explicit call: `utils.runtime.configure_cpu_runtime()` first, as the scripts do;
- opted out: a bare import with OPENSORA_CPU_RUNTIME=0, i.e. Paddle's defaults.
The model is benchmarks/bench_stdit2.py's yardstick preset (depth 4, hidden 192, batch 2, latent 4x16x32x32).
"""

import argparse
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "bare import": ({}, False),
    "explicit call": ({}, True),
    "opted out": ({"OPENSORA_CPU_RUNTIME": "0"}, False),
}


def child(explicit_call, repeats):
    """The user program: build the yardstick STDiT2 and print the median forward time in ms."""
    sys.path.insert(0, REPO)
    if explicit_call:
        from utils.runtime import configure_cpu_runtime

        configure_cpu_runtime()
    import time

    import paddle

    from models.stdit.stdit2 import STDiT2, STDiT2Config

    paddle.seed(0)
    config = STDiT2Config(input_sq_size=256, hidden_size=192, depth=4, num_heads=6, caption_channels=64, model_max_length=20)
    model = STDiT2(config)
    model.eval()
    x = paddle.randn([2, 4, 16, 32, 32])
    y = paddle.randn([2, 1, 20, 64])
    size = {k: paddle.full([2], v) for k, v in dict(height=256.0, width=256.0, num_frames=16.0, ar=1.0, fps=24.0).items()}
    times = []
    with paddle.no_grad():
        for _ in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            model(x, paddle.full([2], 500.0), y, **size)
            times.append((time.perf_counter() - start) * 1000)
    print(json.dumps(sorted(times[1:])[len(times[1:]) // 2]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="forwards per process (median) and processes per case")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "bench_bare_import.json"))
    parser.add_argument("--child", choices=["bare", "explicit"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child == "explicit", args.repeats)
        return

    sys.path.insert(0, REPO)
    from utils.io import write_text_atomic

    results = {}
    for name, (env, explicit) in CASES.items():
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", "explicit" if explicit else "bare", "--repeats", str(args.repeats)],
                env={**os.environ, **env}, capture_output=True, text=True, check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[name] = dict(median_ms=sorted(runs)[len(runs) // 2], runs_ms=runs)
        print(f"{name:<16}{results[name]['median_ms']:>10.0f} ms per forward")
    machine = dict(platform=platform.platform(), cpus=len(os.sched_getaffinity(0)))
    write_text_atomic(args.output, json.dumps(dict(machine=machine, repeats=args.repeats, results=results), indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.output, REPO)}")


if __name__ == "__main__":
    main()
