"""Side-by-side forward time of the original PyTorch STDiT2 (Open-Sora v1.1) and ours, same config, same machine.

    python benchmarks/compare_pytorch.py --torch-python /path/to/venv-with-torch/bin/python \
        --opensora-root /path/to/Open-Sora-v1.1.0

The yardstick config of the performance issue: depth 4, hidden 192, 6 heads, patch (1,2,2), qk-norm,
caption 64 x 20 tokens, batch 2, latent 4x16x32x32, fp32, 2 threads. The two frameworks run alternately in
separate processes (--rounds times), each timing --repeats forwards after a warm-up; medians are reported.
Needs a Python with torch, numpy, einops and rotary-embedding-torch (not part of this project's requirements).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(input_sq_size=256, in_channels=4, patch_size=(1, 2, 2), hidden_size=192, depth=4, num_heads=6, mlp_ratio=4.0,
              class_dropout_prob=0.1, pred_sigma=True, caption_channels=64, model_max_length=20, qk_norm=True)
BATCH, FRAMES, SIZE, TOKENS = 2, 16, 32, 20

TORCH_CHILD = r"""
import sys, time, json, statistics
sys.path.insert(0, {fixtures!r})
import torch
torch.set_num_threads({threads})
from make_stdit2_parity import install_stand_ins, load_source
install_stand_ins()
load_source("opensora.models.layers.blocks", {root!r} + "/opensora/models/layers/blocks.py")
stdit2 = load_source("opensora.models.stdit.stdit2", {root!r} + "/opensora/models/stdit/stdit2.py")
torch.manual_seed(0)
model = stdit2.STDiT2(stdit2.STDiT2Config(**{config!r})).eval()
B, T, S, L = {batch}, {frames}, {size}, {tokens}
x = torch.randn(B, 4, T, S, S); t = torch.full([B], 500.0); y = torch.randn(B, 1, L, 64); mask = torch.ones(B, L, dtype=torch.long)
size = dict(num_frames=torch.full([B], float(T)), height=torch.full([B], 256.0), width=torch.full([B], 256.0), ar=torch.ones(B), fps=torch.full([B], 24.0))
times = []
with torch.no_grad():
    model(x, t, y, mask=mask, **size)
    for _ in range({repeats}):
        start = time.perf_counter(); model(x, t, y, mask=mask, **size); times.append(time.perf_counter() - start)
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
model = STDiT2(STDiT2Config(**{config!r})); model.eval()
B, T, S, L = {batch}, {frames}, {size}, {tokens}
x = paddle.randn([B, 4, T, S, S]); t = paddle.full([B], 500.0); y = paddle.randn([B, 1, L, 64]); mask = paddle.ones([B, L], dtype="int64")
size = dict(num_frames=paddle.full([B], float(T)), height=paddle.full([B], 256.0), width=paddle.full([B], 256.0), ar=paddle.ones([B]), fps=paddle.full([B], 24.0))
times = []
with paddle.no_grad():
    model(x, t, y, mask=mask, **size)
    for _ in range({repeats}):
        start = time.perf_counter(); model(x, t, y, mask=mask, **size); times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def run(python, code, env=None):
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python interpreter with torch installed")
    parser.add_argument("--opensora-root", required=True, help="Open-Sora v1.1.0 checkout (holds opensora/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "compare_pytorch.json"))
    args = parser.parse_args()

    common = dict(config=CONFIG, batch=BATCH, frames=FRAMES, size=SIZE, tokens=TOKENS, repeats=args.repeats)
    torch_code = TORCH_CHILD.format(fixtures=os.path.join(REPO, "tests", "fixtures"), root=args.opensora_root, threads=args.threads, **common)
    paddle_code = PADDLE_CHILD.format(repo=REPO, **common)
    paddle_env = dict(os.environ, OPENSORA_NUM_THREADS=str(args.threads))
    torch_times, paddle_times = [], []
    for _ in range(args.rounds):
        torch_times += run(args.torch_python, torch_code)
        paddle_times += run(sys.executable, paddle_code, paddle_env)
    result = dict(
        config=CONFIG, batch=BATCH, latent=[4, FRAMES, SIZE, SIZE], threads=args.threads,
        pytorch_ms=statistics.median(torch_times) * 1000, paddle_ms=statistics.median(paddle_times) * 1000,
    )
    result["ratio"] = result["paddle_ms"] / result["pytorch_ms"]
    print(f"original PyTorch STDiT2: {result['pytorch_ms']:.0f} ms; ours (Paddle): {result['paddle_ms']:.0f} ms; ratio {result['ratio']:.2f}")
    sys.path.insert(0, REPO)
    from utils.io import write_text_atomic

    write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
