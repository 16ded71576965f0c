"""STDiT2 speed: forward (inference) and forward+backward (training) step time, tokens/s, analytic FLOPs,
achieved GFLOP/s and peak memory, for several presets, plus one XL/2 block at full width.

    python benchmarks/bench_stdit2.py                 # table on stdout, JSON in benchmarks/results/
    python benchmarks/bench_stdit2.py --repeats 5 --presets yardstick

Every figure is the median of --repeats runs after one warm-up run. The "yardstick" preset is the issue's
comparison point: depth 4, hidden 192, 6 heads, caption 64 x 20 tokens, batch 2, latent 4x16x32x32.
"""

import argparse
import json
import os
import platform
import resource
import sys
import time

# Run as `python benchmarks/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from models.stdit.stdit2 import STDiT2, STDiT2Config  # noqa: E402
from utils.io import write_text_atomic  # noqa: E402
from utils.runtime import configure_cpu_runtime  # noqa: E402

# name: (config overrides, batch, latent frames, latent height, latent width, caption tokens)
PRESETS = {
    "tiny": (dict(hidden_size=48, depth=2, num_heads=2, caption_channels=32, model_max_length=12), 2, 4, 8, 8, 12),
    "shipped": (dict(hidden_size=144, depth=4, num_heads=4, caption_channels=64, model_max_length=16, pred_sigma=False), 2, 16, 8, 8, 16),
    "yardstick": (dict(hidden_size=192, depth=4, num_heads=6, caption_channels=64, model_max_length=20), 2, 16, 32, 32, 20),
    "mid": (dict(hidden_size=384, depth=8, num_heads=6, caption_channels=256, model_max_length=50), 1, 16, 16, 16, 50),
    "xl2-one-block": (dict(hidden_size=1152, depth=1, num_heads=16, caption_channels=4096, model_max_length=200), 1, 16, 16, 16, 200),
}


def linear_flops(config, tokens_per_frame, frames, text_tokens):
    """Multiply-adds x 2 of one forward for one sample: the linear layers plus the three attentions."""
    C, N = config.hidden_size, tokens_per_frame * frames
    per_token = 2 * (3 * C * C) + 2 * (C * C)  # qkv and proj of spatial and temporal attention
    per_token += C * C + C * C  # cross-attention q and proj
    per_token += 2 * C * int(C * config.mlp_ratio)  # mlp
    blocks = 2 * N * per_token
    blocks += 2 * 2 * frames * tokens_per_frame**2 * C  # spatial attention: scores and weighted sum
    blocks += 2 * 2 * tokens_per_frame * frames**2 * C  # temporal attention
    blocks += 2 * 2 * N * text_tokens * C + 2 * text_tokens * C * 2 * C  # cross attention and its k/v
    patch = int(np.prod(config.patch_size))
    embed = 2 * N * (config.in_channels * patch * C + C * patch * (2 * config.in_channels if config.pred_sigma else config.in_channels))
    return config.depth * blocks + embed


def build_inputs(batch, frames, height, width, text_tokens, caption_channels):
    x = paddle.randn([batch, 4, frames, height, width])
    t = paddle.full([batch], 500.0)
    y = paddle.randn([batch, 1, text_tokens, caption_channels])
    mask = paddle.ones([batch, text_tokens], dtype="int64")
    size = {k: paddle.full([batch], v) for k, v in dict(num_frames=frames, height=height * 8.0, width=width * 8.0, ar=height / width, fps=24.0).items()}
    return x, t, y, mask, size


def median_time(step, repeats):
    step()  # warm-up: kernel selection and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflop_per_s(repeats, size=2048):
    """fp32 GFLOP/s of one large square matmul: the best this machine's Paddle does, the yardstick for the
    model's achieved GFLOP/s."""
    a, b = paddle.randn([size, size]), paddle.randn([size, size])
    return 2 * size**3 / median_time(lambda: paddle.matmul(a, b), repeats) / 1e9


def bench_preset(name, repeats, train):
    overrides, batch, frames, height, width, text_tokens = PRESETS[name]
    config = STDiT2Config(**{"patch_size": (1, 2, 2), "qk_norm": True, "input_sq_size": 256, **overrides})
    paddle.seed(0)
    model = STDiT2(config)
    x, t, y, mask, size = build_inputs(batch, frames, height, width, text_tokens, config.caption_channels)
    tokens = batch * frames * (height // 2) * (width // 2)
    flops = batch * linear_flops(config, (height // 2) * (width // 2), frames, text_tokens)

    model.eval()
    with paddle.no_grad():
        forward_s = median_time(lambda: model(x, t, y, mask=mask, **size), repeats)
    result = dict(
        preset=name, batch=batch, latent=[4, frames, height, width], tokens=tokens,
        parameters=sum(int(np.prod(p.shape)) for p in model.parameters()),
        forward_ms=forward_s * 1000, forward_tokens_per_s=tokens / forward_s,
        forward_gflop=flops / 1e9, forward_gflop_per_s=flops / forward_s / 1e9,
    )
    if train:
        model.train()
        model.y_embedder.uncond_prob = 0.0
        optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())

        def train_step():
            loss = (model(x, t, y, mask=mask, **size) ** 2).mean()
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()

        train_s = median_time(train_step, repeats)
        # backward costs about twice the forward
        result.update(train_step_ms=train_s * 1000, train_gflop_per_s=3 * flops / train_s / 1e9)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="forward only")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "bench_stdit2.json"))
    args = parser.parse_args()

    threads = configure_cpu_runtime()
    machine = dict(
        platform=platform.platform(), processor=platform.processor() or platform.machine(),
        cpus=len(os.sched_getaffinity(0)), threads=threads, paddle=paddle.__version__,
        device=paddle.device.get_device(), mkl_debug_cpu_type=os.environ.get("MKL_DEBUG_CPU_TYPE"),
    )
    peak = matmul_peak_gflop_per_s(args.repeats)
    print(f"matmul peak (2048^3 fp32): {peak:.1f} GFLOP/s")
    results = []
    print(f"{'preset':<14}{'tokens':>8}{'fwd ms':>10}{'tok/s':>10}{'GFLOP':>9}{'GFLOP/s':>9}{'%peak':>7}{'train ms':>10}{'GFLOP/s':>9}{'RSS MB':>9}")
    for name in args.presets:
        # the mid and XL sizes are too slow to train repeatedly on a small CPU; time their forward only
        r = bench_preset(name, args.repeats, train=not args.no_train and name in ("tiny", "shipped", "yardstick"))
        r["forward_fraction_of_peak"] = r["forward_gflop_per_s"] / peak
        results.append(r)
        print(
            f"{name:<14}{r['tokens']:>8}{r['forward_ms']:>10.1f}{r['forward_tokens_per_s']:>10.0f}{r['forward_gflop']:>9.2f}"
            f"{r['forward_gflop_per_s']:>9.1f}{100 * r['forward_fraction_of_peak']:>7.0f}"
            f"{r.get('train_step_ms', float('nan')):>10.1f}"
            f"{r.get('train_gflop_per_s', float('nan')):>9.1f}{r['peak_rss_mb']:>9.0f}",
            flush=True,
        )
    write_text_atomic(args.output, json.dumps(dict(machine=machine, repeats=args.repeats, matmul_peak_gflop_per_s=peak, results=results), indent=2) + "\n")
    print(f"machine: {machine}\nwrote {args.output}")


if __name__ == "__main__":
    main()
