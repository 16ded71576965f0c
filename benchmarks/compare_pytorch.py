"""Side-by-side time of the original PyTorch STDiT2 (Open-Sora v1.1) and ours: forward, or a training step.

    python benchmarks/compare_pytorch.py --torch-python /path/to/venv-with-torch/bin/python \
        --opensora-root /path/to/Open-Sora-v1.1.0 [--mode forward|train|both] [--grad-checkpoint]

The yardstick config of the performance issue: depth 4, hidden 192, 6 heads, patch (1,2,2), qk-norm,
caption 64 x 20 tokens, batch 2, latent 4x16x32x32, fp32, 2 threads. The two frameworks run alternately in
separate processes (--rounds times), each timing --repeats forwards or steps after a warm-up (one forward,
two training steps); medians are reported.

`--mode train` times a training step on both sides, split into its parts: the forward in training mode plus
an MSE loss against a fixed random target, the backward, and the AdamW update (lr 2e-5, weight decay 0,
eps 1e-8, as the original's training configs; each framework's default AdamW implementation) with zeroing
of the gradients. Caption dropout is off on both sides (class_dropout_prob 0) so that both do the same
work every step. `--grad-checkpoint` recomputes each block in the backward (the original's
`grad_checkpoint = True`, through torch.utils.checkpoint; ours `gradient_checkpointing`).

Needs a Python with torch, numpy, einops and rotary-embedding-torch (not part of this project's requirements).
The results JSON keeps one entry per mode, so a run of one mode leaves the other's last figures in place.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(input_sq_size=256, in_channels=4, patch_size=(1, 2, 2), hidden_size=192, depth=4, num_heads=6, mlp_ratio=4.0,
              class_dropout_prob=0.1, pred_sigma=True, caption_channels=64, model_max_length=20, qk_norm=True)
BATCH, FRAMES, SIZE, TOKENS = 2, 16, 32, 20
ADAMW = dict(lr=2e-5, weight_decay=0.0, eps=1e-8)
PARTS = ("forward", "backward", "optimizer")
# Untimed training steps first: the heap of both frameworks grows over the first steps (Paddle's second step
# still spends about a second page-faulting fresh activation buffers), and a benchmark times the steady state.
TRAIN_WARMUP_STEPS = 2

# Both children print one JSON line: a list of seconds per forward, or {part: [seconds per step]} in train mode.
TORCH_CHILD = r"""
import sys, time, json
sys.path.insert(0, {fixtures!r})
import torch
torch.set_num_threads({threads})
from make_stdit2_parity import install_stand_ins, load_source
install_stand_ins()
if {grad_checkpoint!r}:
    import torch.utils.checkpoint
    sys.modules["opensora.acceleration.checkpoint"].auto_grad_checkpoint = (
        lambda block, *args: torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False))
load_source("opensora.models.layers.blocks", {root!r} + "/opensora/models/layers/blocks.py")
stdit2 = load_source("opensora.models.stdit.stdit2", {root!r} + "/opensora/models/stdit/stdit2.py")
torch.manual_seed(0)
model = stdit2.STDiT2(stdit2.STDiT2Config(**{config!r}))
B, T, S, L = {batch}, {frames}, {size}, {tokens}
x = torch.randn(B, 4, T, S, S); t = torch.full([B], 500.0); y = torch.randn(B, 1, L, 64); mask = torch.ones(B, L, dtype=torch.long)
size = dict(num_frames=torch.full([B], float(T)), height=torch.full([B], 256.0), width=torch.full([B], 256.0), ar=torch.ones(B), fps=torch.full([B], 24.0))
if {mode!r} == "forward":
    model.eval()
    times = []
    with torch.no_grad():
        model(x, t, y, mask=mask, **size)
        for _ in range({repeats}):
            start = time.perf_counter(); model(x, t, y, mask=mask, **size); times.append(time.perf_counter() - start)
else:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **{adamw!r})
    target = torch.randn(B, 8, T, S, S)
    times = dict(forward=[], backward=[], optimizer=[])
    for step in range({repeats} + {warmup}):
        start = time.perf_counter()
        loss = ((model(x, t, y, mask=mask, **size) - target) ** 2).mean()
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        optimizer.step(); optimizer.zero_grad()
        end = time.perf_counter()
        if step >= {warmup}:
            for part, seconds in zip(times, (forward_end - start, backward_end - forward_end, end - backward_end)):
                times[part].append(seconds)
print(json.dumps(times))
"""

PADDLE_CHILD = r"""
import sys, time, json, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {repo!r})
import paddle
from models.stdit.stdit2 import STDiT2, STDiT2Config
from utils.runtime import configure_cpu_runtime
configure_cpu_runtime()
paddle.seed(0)
model = STDiT2(STDiT2Config(**{config!r}, gradient_checkpointing={grad_checkpoint!r}))
B, T, S, L = {batch}, {frames}, {size}, {tokens}
x = paddle.randn([B, 4, T, S, S]); t = paddle.full([B], 500.0); y = paddle.randn([B, 1, L, 64]); mask = paddle.ones([B, L], dtype="int64")
size = dict(num_frames=paddle.full([B], float(T)), height=paddle.full([B], 256.0), width=paddle.full([B], 256.0), ar=paddle.ones([B]), fps=paddle.full([B], 24.0))
if {mode!r} == "forward":
    model.eval()
    times = []
    with paddle.no_grad():
        model(x, t, y, mask=mask, **size)
        for _ in range({repeats}):
            start = time.perf_counter(); model(x, t, y, mask=mask, **size); times.append(time.perf_counter() - start)
else:
    model.train()
    adamw = {adamw!r}
    optimizer = paddle.optimizer.AdamW(learning_rate=adamw["lr"], weight_decay=adamw["weight_decay"], epsilon=adamw["eps"],
                                       parameters=[p for p in model.parameters() if not p.stop_gradient])
    target = paddle.randn([B, 8, T, S, S])
    times = dict(forward=[], backward=[], optimizer=[])
    for step in range({repeats} + {warmup}):
        start = time.perf_counter()
        loss = ((model(x, t, y, mask=mask, **size) - target) ** 2).mean()
        forward_end = time.perf_counter()
        loss.backward()
        backward_end = time.perf_counter()
        optimizer.step(); optimizer.clear_grad()
        end = time.perf_counter()
        if step >= {warmup}:
            for part, seconds in zip(times, (forward_end - start, backward_end - forward_end, end - backward_end)):
                times[part].append(seconds)
print(json.dumps(times))
"""


def run(python, code, env=None):
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"benchmark child failed ({python}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_ms(seconds):
    return statistics.median(seconds) * 1000


def compare(args, mode):
    """Alternate the two frameworks for `args.rounds` rounds; returns this mode's entry of the results JSON."""
    config = dict(CONFIG, class_dropout_prob=0.0) if mode == "train" else CONFIG
    common = dict(config=config, batch=BATCH, frames=FRAMES, size=SIZE, tokens=TOKENS, repeats=args.repeats, mode=mode,
                  adamw=ADAMW, grad_checkpoint=args.grad_checkpoint and mode == "train", warmup=TRAIN_WARMUP_STEPS)
    torch_code = TORCH_CHILD.format(fixtures=os.path.join(REPO, "tests", "fixtures"), root=args.opensora_root,
                                    threads=args.threads, **common)
    paddle_code = PADDLE_CHILD.format(repo=REPO, **common)
    paddle_env = dict(os.environ, OPENSORA_NUM_THREADS=str(args.threads))
    runs = dict(pytorch=[], paddle=[])
    for _ in range(args.rounds):
        runs["pytorch"].append(run(args.torch_python, torch_code))
        runs["paddle"].append(run(sys.executable, paddle_code, paddle_env))

    entry = dict(config=config, rounds=args.rounds, repeats=args.repeats)
    if mode == "train":
        entry["warmup_steps"] = TRAIN_WARMUP_STEPS
    if mode == "forward":
        for side, rounds in runs.items():
            entry[f"{side}_ms"] = median_ms([s for times in rounds for s in times])
        entry["ratio"] = entry["paddle_ms"] / entry["pytorch_ms"]
        print(f"forward: original PyTorch STDiT2 {entry['pytorch_ms']:.0f} ms; ours (Paddle) {entry['paddle_ms']:.0f} ms; "
              f"ratio {entry['ratio']:.2f}")
        return entry

    entry.update(optimizer=dict(name="AdamW", **ADAMW), grad_checkpoint=args.grad_checkpoint, caption_dropout=0.0)
    for side, rounds in runs.items():
        steps = {part: [s for times in rounds for s in times[part]] for part in PARTS}
        totals = [sum(parts) for parts in zip(*(steps[part] for part in PARTS))]
        entry[side] = dict({f"{part}_ms": median_ms(steps[part]) for part in PARTS}, step_ms=median_ms(totals))
    entry["ratio"] = {key: entry["paddle"][key] / entry["pytorch"][key] for key in entry["paddle"]}
    print(f"training step{' (gradient checkpointing)' if args.grad_checkpoint else ''}, median ms:")
    print(f"{'':<10}{'forward':>9}{'backward':>10}{'optimizer':>11}{'step':>8}")
    for side, label in (("pytorch", "PyTorch"), ("paddle", "Paddle"), ("ratio", "ratio")):
        values = [entry[side][f"{part}_ms"] for part in PARTS + ("step",)]
        fmt = "{:>9.2f}x" if side == "ratio" else "{:>10.0f}"
        print(f"{label:<10}" + "".join(fmt.format(value) for value in values))
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python interpreter with torch installed")
    parser.add_argument("--opensora-root", required=True, help="Open-Sora v1.1.0 checkout (holds opensora/)")
    parser.add_argument("--mode", choices=("forward", "train", "both"), default="forward")
    parser.add_argument("--grad-checkpoint", action="store_true", help="train mode: recompute every block in the backward")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "compare_pytorch.json"))
    args = parser.parse_args()

    sys.path.insert(0, REPO)
    from utils.io import write_text_atomic

    load_before = os.getloadavg()
    modes = ("forward", "train") if args.mode == "both" else (args.mode,)
    entries = {mode: compare(args, mode) for mode in modes}
    machine = dict(platform=platform.platform(), processor=cpu_model(), cpus=len(os.sched_getaffinity(0)),
                   threads=args.threads, load_average_before=load_before, load_average_after=os.getloadavg())
    results = {}
    if os.path.isfile(args.output):
        with open(args.output) as f:
            results = json.load(f)
        if "pytorch_ms" in results:  # the forward-only layout of earlier versions
            results = dict(forward=results)
    for mode, entry in entries.items():
        key = "train_grad_checkpoint" if mode == "train" and args.grad_checkpoint else mode
        results[key] = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            machine=machine, batch=BATCH, latent=[4, FRAMES, SIZE, SIZE], **entry)
    write_text_atomic(args.output, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


def cpu_model():
    """The CPU's model name (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


if __name__ == "__main__":
    main()
