"""Cost of reproducible results: the STDiT2 yardstick with MKL's strict reproducible mode (the default set by
`configure_cpu_runtime`, MKL_CBWR=AUTO,STRICT) against MKL's own default (MKL_CBWR=AUTO), whose results depend
on the thread count.

    python benchmarks/bench_determinism.py --rounds 3

Each round runs `bench_stdit2.py --presets yardstick` once per mode in fresh processes, alternating, so that
load from elsewhere on the machine falls on both; the table gives the median over rounds.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from utils.io import write_text_atomic  # noqa: E402

MODES = {"strict (default)": "AUTO,STRICT", "MKL default": "AUTO"}


def run_yardstick(mkl_cbwr, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "result.json")
        subprocess.run(
            [sys.executable, os.path.join(REPO, "benchmarks", "bench_stdit2.py"), "--presets", "yardstick",
             "--repeats", str(repeats), "--output", output],
            cwd=REPO, check=True, capture_output=True, env=dict(os.environ, MKL_CBWR=mkl_cbwr),
        )
        with open(output) as f:
            (result,) = json.load(f)["results"]
    return result


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "bench_determinism.json"))
    args = parser.parse_args()
    runs = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, value in MODES.items():
            runs[mode].append(run_yardstick(value, args.repeats))
    summary = {}
    for mode in MODES:
        summary[mode] = {key: median([run[key] for run in runs[mode]]) for key in ("forward_ms", "train_step_ms")}
        print(f"{mode:18s} forward {summary[mode]['forward_ms']:7.1f} ms   train step {summary[mode]['train_step_ms']:7.1f} ms")
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpus=len(os.sched_getaffinity(0)), date=time.strftime("%Y-%m-%d"))
    write_text_atomic(args.output, json.dumps(dict(machine=machine, rounds=args.rounds, median=summary, runs=runs), indent=2) + "\n")
    print(f"wrote {os.path.relpath(args.output, REPO)}")


if __name__ == "__main__":
    main()
