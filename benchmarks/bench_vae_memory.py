"""Peak memory of VAE decoding against the number of frames: bounded by --micro-batch-size, not by T.

    python benchmarks/bench_vae_memory.py                 # shipped VAE, 256x256, T = 8, 32, 96
    python benchmarks/bench_vae_memory.py --vae-path converted/vae --frames 16 64 --size 480 854

Each measurement runs in a fresh process (peak RSS is monotonic within a process) and reports the peak
resident memory above the process's footprint after loading the VAE and allocating the latents.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def measure(vae_path, frames, height, width, micro_batch_size):
    """Runs in the child process: decode [1, C, frames, h, w] and print the RSS growth in MB."""
    import paddle

    from models.vae.vae import VideoAutoencoderKL
    from utils.runtime import configure_cpu_runtime

    configure_cpu_runtime()
    vae = VideoAutoencoderKL.from_pretrained(vae_path, micro_batch_size=micro_batch_size or None)
    latents = paddle.randn([1, vae.out_channels, frames, height // vae.patch_size[1], width // vae.patch_size[2]])
    # warm up kernels on one frame, so the baseline includes allocator pools that do not grow with T
    vae.decode(latents[:, :, :1])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    video = vae.decode(latents)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    output_mb = video.numel().item() * 4 / 2**20
    print(json.dumps(dict(frames=frames, peak_growth_mb=(peak - baseline) / 1024, output_mb=output_mb)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae-path", default=os.path.join(REPO, "assets", "default_model", "vae"))
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[4, 0], help="0 = all frames at once")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "bench_vae_memory.json"))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        vae_path, frames, height, width, micro = args.child
        measure(vae_path, int(frames), int(height), int(width), int(micro))
        return

    from utils.io import write_text_atomic

    rows = []
    print(f"{'micro-batch':>12}{'frames':>8}{'output MB':>11}{'peak growth MB':>16}")
    for micro in args.micro_batch_sizes:
        for frames in args.frames:
            child = [sys.executable, __file__, "--child", args.vae_path, str(frames), str(args.size[0]), str(args.size[1]), str(micro)]
            result = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            result["micro_batch_size"] = micro or "all"
            rows.append(result)
            print(f"{str(result['micro_batch_size']):>12}{frames:>8}{result['output_mb']:>11.1f}{result['peak_growth_mb']:>16.1f}", flush=True)
    machine = dict(platform=platform.platform(), cpus=len(os.sched_getaffinity(0)))
    write_text_atomic(args.output, json.dumps(dict(machine=machine, size=args.size, vae=os.path.relpath(args.vae_path, REPO), results=rows), indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
