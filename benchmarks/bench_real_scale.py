"""Real-scale plan: time and peak memory of one XL/2 STDiT2 generation on this CPU, T5-XXL and SD-VAE included.

    python benchmarks/bench_real_scale.py                                    # 16x256x256 and 16x240x426
    python benchmarks/bench_real_scale.py --sizes 16x256x256 --steps 1 --micro-batch-sizes 4
    python benchmarks/bench_real_scale.py --stdit-config configs/stdit2/tiny.json --text-encoder tiny --vae tiny \
        --sizes 4x64x64 --min-available-gb 0 --output /tmp/tiny.json     # seconds, for a smoke test

Every model has random weights at the real sizes: the STDiT2 of --stdit-config (default XL/2, 767M
parameters), a T5-v1.1-XXL-sized text encoder (4.76B parameters, 19 GB in fp32) and SD's VAE
(stabilityai/sd-vae-ft-ema's config, 84M). Nothing is materialised twice: the STDiT2 and the VAE are built
under `paddle.LazyGuard` and initialised parameter by parameter; the text encoder is never whole, it runs
through `StreamedT5EncoderModel`, which materialises one block's weights (random, drawn block by block),
runs the hidden states through it and frees it before the next. That is what `scripts/inference.py
--stream-text-encoder` runs on a converted checkpoint, except that it reads each block from the safetensors
file where this benchmark draws it (the "(weights)" column: time spent drawing).

Each size runs in a fresh process, in the phases of a generation:
  1. text: the prompts through the streamed encoder; then the encoder is released (only the features stay);
  2. sampling: build the STDiT2, then the first --steps steps of the --default-steps IDDPM schedule (Open-Sora
     v1.1: 100), each one model call on the CFG-doubled batch; the total is extrapolated from them;
  3. decode: the sampled latents through the VAE once per --micro-batch-sizes (frames decoded at once),
     with the STDiT2 still resident, as in the pipeline.
Peak resident memory is the kernel's own high-water mark, VmHWM of /proc/self/status, reset at the start of
each phase by writing 5 to /proc/self/clear_refs (Linux >= 4.0), so each phase has its own peak; the whole
generation's peak is the largest of them (every moment of the run belongs to a phase). Between phases freed
memory is handed back to the kernel (glibc malloc_trim), so "after release" is what is still live.
A guard thread stops the run (exit 3) if this process exceeds --max-rss-gb or the machine's available memory
falls below 1 GiB. Timings are wall-clock on whatever else the machine is running; the JSON keeps the load
average and, next to each time, the CPU seconds of this process (all threads), which a busy machine inflates less.
"""

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as `python benchmarks/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from models.text_encoder.streamed_t5 import T5Weights, t5_encoder_shapes  # noqa: E402

MB = 2**20
GB = 2**30

# google/t5-v1_1-xxl (DeepFloyd's copy, which Open-Sora v1.1 uses), encoder side.
T5_PRESETS = {
    "xxl": dict(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, layer_norm_epsilon=1e-6, dropout_rate=0.0),
    "tiny": dict(vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                 feed_forward_proj="gated-gelu", dropout_rate=0.0),
}
# stabilityai/sd-vae-ft-ema's config.json (Open-Sora v1.1's VAE); scaling_factor is AutoencoderKL's default 0.18215.
VAE_PRESETS = {
    "sd": dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=256,
               up_block_types=["UpDecoderBlock2D"] * 4),
    "tiny": dict(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=2, latent_channels=4, layers_per_block=1),
}
DEFAULT_SIZES = ["16x256x256", "16x240x426"]


# ------------------------------------------------------------------------------------------ memory


def proc_status(field):
    """A /proc/self/status field in bytes (VmHWM, VmRSS, ...)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def available_memory():
    """MemAvailable of the machine in bytes."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def release_freed_memory():
    """Collect garbage and hand the heap's free pages back to the kernel (the runtime set-up keeps up to 2 GB)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak resident memory per phase, from the kernel's VmHWM, reset by /proc/self/clear_refs at each phase."""

    def __init__(self):
        self.whole = proc_status("VmHWM")
        self.resettable = self.reset()

    def reset(self):
        self.whole = max(self.whole, proc_status("VmHWM"))
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak(self):
        """Peak since the last reset (since the start of the process if the kernel cannot reset it)."""
        value = proc_status("VmHWM")
        self.whole = max(self.whole, value)
        return value


class MemoryGuard(threading.Thread):
    """Ends the process before it can push the machine into an out-of-memory kill."""

    def __init__(self, max_rss, min_available=GB, interval=0.2):
        super().__init__(daemon=True)
        self.max_rss, self.min_available, self.interval = max_rss, min_available, interval

    def problem(self):
        """Why the run must stop now, or None."""
        rss, available = proc_status("VmRSS"), available_memory()
        if rss > self.max_rss or available < self.min_available:
            return (f"memory guard: resident {rss / GB:.1f} GiB (limit {self.max_rss / GB:.1f}), machine available "
                    f"{available / GB:.1f} GiB (limit {self.min_available / GB:.1f}); stopping")
        return None

    def run(self):
        while (problem := self.problem()) is None:
            time.sleep(self.interval)
        print(problem, file=sys.stderr, flush=True)
        os._exit(3)  # sys.exit would end only this thread


# ------------------------------------------------------------------------------------------ models


class RandomT5Weights(T5Weights):
    """Random T5 encoder weights drawn tensor by tensor when the streamed encoder asks for them (uniform, with
    the standard deviation of a fan-in initialisation; norms are ones), seeded per tensor so the same name
    always gives the same values; the token embedding is seeded per row, so that the rows of a prompt's
    tokens are drawn without the whole table. `seconds` adds up the time spent drawing them."""

    def __init__(self, config, seed=0):
        from paddlenlp.transformers import T5Config

        self.shapes = t5_encoder_shapes(T5Config(**config))
        self.streams = {name: index for index, name in enumerate(self.shapes)}
        self.seed = seed
        self.seconds = 0.0

    def names(self):
        return list(self.shapes)

    def _draw(self, name, shape, *stream):
        rng = np.random.default_rng([self.seed, self.streams[name], *stream])
        std = 1.0 if name == "shared.weight" or "relative_attention_bias" in name else shape[0] ** -0.5
        values = rng.random(shape, dtype=np.float32)
        values -= 0.5
        values *= std * 12**0.5
        return values

    def tensor(self, name):
        if name == "shared.weight":
            return self.rows(name, range(self.shapes[name][0]))
        start = time.perf_counter()
        shape = self.shapes[name]
        values = np.ones(shape, np.float32) if name.endswith("layer_norm.weight") else self._draw(name, shape)
        self.seconds += time.perf_counter() - start
        return values

    def rows(self, name, ids):
        start = time.perf_counter()
        values = np.stack([self._draw(name, self.shapes[name][1:], int(i)) for i in ids])
        self.seconds += time.perf_counter() - start
        return values


class StopSampling(Exception):
    """Raised by the step callback once the measured steps are done."""


class PrecomputedCaptions:
    """What the sampler sees as its text encoder once the real one is released: the features encoded before,
    and the STDiT2's learned null caption for classifier-free guidance (as `T5Encoder.null`)."""

    def __init__(self, features, y_embedder):
        self.features, self.y_embedder = features, y_embedder

    def encode(self, prompts):
        return self.features

    def null(self, n):
        return self.y_embedder.y_embedding[None].tile([n, 1, 1])[:, None]


def clock():
    """Wall-clock and this process's CPU seconds (all threads), as an array so that differences subtract."""
    return np.array([time.perf_counter(), time.process_time()])


def build_lazily(build):
    """The model `build()` makes, constructed under LazyGuard and then initialised one parameter at a time."""
    import paddle

    with paddle.LazyGuard():
        model = build()
    for param in model.parameters():
        param.initialize()
    model.eval()
    return model


def parameter_count(model_or_weights):
    if isinstance(model_or_weights, RandomT5Weights):
        return sum(int(np.prod(shape)) for shape in model_or_weights.shapes.values())
    return sum(int(np.prod(param.shape)) for param in model_or_weights.parameters())


def random_prompt_tokens(batch, prompt_tokens, max_length, vocab_size, seed):
    """Token ids [B, max_length] of `prompt_tokens` random tokens, the end token (1) and padding (0), and the mask."""
    import paddle

    rng = np.random.default_rng(seed)
    ids = np.zeros([batch, max_length], np.int64)
    length = min(prompt_tokens, max_length - 1)
    ids[:, :length] = rng.integers(2, vocab_size, [batch, length])
    ids[:, length] = 1
    mask = (np.arange(max_length) <= length).astype(np.int64)[None].repeat(batch, 0)
    return paddle.to_tensor(ids), paddle.to_tensor(mask)


# ------------------------------------------------------------------------------------------ one generation


def run_generation(stdit_config, t5_config, vae_config, num_frames, height, width, batch=1, steps=2, default_steps=100,
                   micro_batch_sizes=(1, 4), prompt_tokens=40, cfg_scale=7.0, seed=0):
    """Run the phases of one generation in this process and return its row (seconds, bytes)."""
    import paddle
    from paddlenlp.transformers import T5Config
    from paddlenlp.transformers.t5.modeling import T5Block
    from ppdiffusers import AutoencoderKL

    from models.stdit.stdit2 import STDiT2
    from models.text_encoder.streamed_t5 import StreamedT5EncoderModel
    from models.vae.vae import VideoAutoencoderKL
    from schedulers.iddpm import IDDPM

    paddle.seed(seed)
    row = dict(num_frames=num_frames, height=height, width=width, batch=batch)
    memory = PeakMemory()
    row["peak_resettable"] = memory.resettable
    release_freed_memory()
    memory.reset()
    row["rss_start"] = proc_status("VmRSS")

    # 1. text: the streamed encoder holds one block at a time; afterwards only the features remain
    weights = RandomT5Weights(t5_config, seed)
    encoder = StreamedT5EncoderModel(T5Config(**t5_config), weights)
    input_ids, caption_mask = random_prompt_tokens(batch, prompt_tokens, stdit_config.model_max_length, t5_config["vocab_size"], seed)
    start = clock()
    features = encoder(input_ids=input_ids, attention_mask=caption_mask)[0]
    row["text_encode_s"], row["text_encode_cpu_s"] = clock() - start
    row["text_weights_s"] = weights.seconds
    row["text_peak"] = memory.peak()
    del encoder, weights
    release_freed_memory()
    row["t5_blocks_alive_after_release"] = sum(isinstance(obj, T5Block) for obj in gc.get_objects())
    row["rss_after_text_release"] = proc_status("VmRSS")
    captions = {"y": features[:, None], "mask": caption_mask}

    # 2. sampling: IDDPM steps, one model call on the [prompts, null captions] batch each
    memory.reset()
    start = clock()
    model = build_lazily(lambda: STDiT2(stdit_config))
    row["stdit_build_s"], row["stdit_build_cpu_s"] = clock() - start
    row["stdit_parameters"] = parameter_count(model)
    row["rss_after_stdit_build"] = proc_status("VmRSS")
    vae = VideoAutoencoderKL(build_lazily(lambda: AutoencoderKL(**vae_config)))
    latent_size = [num_frames, height // vae.patch_size[1], width // vae.patch_size[2]]
    row["latent"] = [vae.out_channels, *latent_size]
    row["tokens_per_sample"] = int(np.prod(model.get_dynamic_size(paddle.zeros([1, 1, *latent_size]))))
    dtype = model.x_embedder.proj.weight.dtype
    size_args = {key: paddle.full([batch], value, dtype=dtype) for key, value in
                 dict(height=height, width=width, num_frames=num_frames, ar=height / width, fps=24).items()}
    z = paddle.randn([batch, vae.out_channels, *latent_size])
    step_ends, latents = [], []

    def after_step(index, t, z):
        step_ends.append(clock())
        if len(step_ends) == steps:  # the first `steps` steps of the real schedule, then stop
            latents.append(z)
            raise StopSampling
        return z

    scheduler = IDDPM(num_sampling_steps=default_steps, cfg_scale=cfg_scale)
    start = clock()
    try:
        scheduler.sample(model, PrecomputedCaptions(captions, model.y_embedder), z, [""] * batch, size_args,
                         progress=False, step_callback=after_step)
    except StopSampling:
        pass
    samples = latents[0]
    step_seconds = np.diff([start, *step_ends], axis=0)  # [steps, (wall, cpu)]
    row["step_s"], row["step_cpu_s"] = step_seconds.T.tolist()
    # the first step also projects the caption for every cross-attention and warms the kernels up
    steady = step_seconds[1:] if steps > 1 else step_seconds
    row["steady_step_s"], row["steady_step_cpu_s"] = np.median(steady, axis=0).tolist()
    row["sampling_peak"] = memory.peak()

    # 3. decode, the transformer still resident as in the pipeline
    row["decode"] = []
    for micro_batch_size in micro_batch_sizes:
        release_freed_memory()
        memory.reset()
        vae.micro_batch_size = micro_batch_size or None
        rss_before = proc_status("VmRSS")
        start = clock()
        video = vae.decode(samples)
        seconds, cpu_seconds = clock() - start
        row["decode"].append(dict(micro_batch_size=micro_batch_size or "all", seconds=seconds, cpu_seconds=cpu_seconds,
                                  peak=memory.peak(), rss_before=rss_before))
        row["video_shape"] = list(video.shape)
        del video
    row["vae_parameters"] = parameter_count(vae.module)
    row["whole_peak"] = max(memory.whole, memory.peak())

    # the total decodes with the pipeline's default micro-batch (4) when it was measured
    decode = next((d for d in row["decode"] if d["micro_batch_size"] == 4), row["decode"][0] if row["decode"] else None)
    row["default_steps"] = default_steps
    row["total_default_steps_s"] = (row["text_encode_s"] + row["stdit_build_s"] + row["step_s"][0]
                                    + (default_steps - 1) * row["steady_step_s"] + (decode["seconds"] if decode else 0.0))
    row["total_uses_micro_batch_size"] = decode["micro_batch_size"] if decode else None
    return row


# ------------------------------------------------------------------------------------------ the table


def memory_arithmetic(t5_config, stdit_parameters, vae_parameters):
    """Bytes of holding each model whole, for machines that can."""
    t5 = RandomT5Weights(t5_config)
    block = sum(int(np.prod(shape)) for name, shape in t5.shapes.items() if name.startswith("encoder.block.1."))
    return dict(
        t5_parameters=parameter_count(t5), t5_fp32=4 * parameter_count(t5), t5_bf16=2 * parameter_count(t5),
        t5_block_parameters=block, t5_block_fp32=4 * block,
        t5_embedding_fp32=4 * t5_config["vocab_size"] * t5_config["d_model"],
        stdit_parameters=stdit_parameters, stdit_fp32=4 * stdit_parameters, stdit_bf16=2 * stdit_parameters,
        vae_parameters=vae_parameters, vae_fp32=4 * vae_parameters,
    )


def format_table(rows, header=True):
    lines = [] if not header else [
        f"{'size':>12}{'tokens':>8}{'text s':>8}{'(weights)':>10}{'text GiB':>9}{'after GiB':>10}{'build s':>9}"
        f"{'step s':>8}{'samp GiB':>9}{'decode s / GiB per micro-batch':>35}{'total min':>11}{'peak GiB':>9}",
    ]
    for r in rows:
        decode = "  ".join(f"{d['micro_batch_size']}: {d['seconds']:.0f} s {d['peak'] / GB:.2f}" for d in r["decode"])
        lines.append(
            f"{r['num_frames']}x{r['height']}x{r['width']:<4}{r['tokens_per_sample']:>8}{r['text_encode_s']:>8.1f}"
            f"{r['text_weights_s']:>10.1f}{r['text_peak'] / GB:>9.2f}{r['rss_after_text_release'] / GB:>10.2f}"
            f"{r['stdit_build_s']:>9.1f}{r['steady_step_s']:>8.1f}{r['sampling_peak'] / GB:>9.2f}{decode:>35}"
            f"{r['total_default_steps_s'] / 60:>11.1f}{r['whole_peak'] / GB:>9.2f}"
        )
    return "\n".join(lines)


def parse_size(text):
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 16x256x256") from None
    return frames, height, width


def load_preset(value, presets, what):
    if value in presets:
        return presets[value]
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return json.load(f)
    raise argparse.ArgumentTypeError(f"{what} {value!r}: not one of {sorted(presets)} nor a JSON file")


def machine_description():
    import paddle

    with open("/proc/meminfo", encoding="ascii") as f:
        total = int(f.readline().split()[1]) * 1024
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    return dict(platform=platform.platform(), processor=model or platform.machine(), cpus=len(os.sched_getaffinity(0)),
                memory_gb=round(total / GB, 1), paddle=paddle.__version__, load_average=list(os.getloadavg()))


def run_size(args, size):
    """`run_generation` at size (frames, height, width) with the models and settings of the command line."""
    from models.stdit.stdit2 import STDiT2Config

    frames, height, width = size
    return run_generation(STDiT2Config.from_json_file(args.stdit_config), load_preset(args.text_encoder, T5_PRESETS, "text encoder"),
                          load_preset(args.vae, VAE_PRESETS, "VAE"), frames, height, width, batch=args.batch, steps=args.steps,
                          default_steps=args.default_steps, micro_batch_sizes=args.micro_batch_sizes,
                          prompt_tokens=args.prompt_tokens, seed=args.seed)


def child_main(args):
    MemoryGuard(int(args.max_rss_gb * GB)).start()
    print(json.dumps(run_size(args, args.child)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdit-config", default=os.path.join(REPO, "configs", "stdit2", "xl2.json"))
    parser.add_argument("--text-encoder", default="xxl", help=f"T5 config: {sorted(T5_PRESETS)} or a JSON file")
    parser.add_argument("--vae", default="sd", help=f"AutoencoderKL config: {sorted(VAE_PRESETS)} or a JSON file")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in DEFAULT_SIZES], metavar="TxHxW")
    parser.add_argument("--batch", type=int, default=1, help="prompts (videos) generated together")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps measured")
    parser.add_argument("--default-steps", type=int, default=100, help="steps of the extrapolated total (v1.1 IDDPM: 100)")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="*", default=[1, 4],
                        help="VAE frames decoded at once, one decode each; 0 = all; none: no decode (nor in the total)")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="tokens of each random prompt (padded to the model's 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="stop a run whose resident memory exceeds this")
    parser.add_argument("--min-available-gb", type=float, default=10.0, help="do not start a run with less available memory")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "bench_real_scale.json"))
    parser.add_argument("--child", type=parse_size, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= args.default_steps:
        parser.error(f"--steps {args.steps}: measure between 1 and --default-steps ({args.default_steps}) steps")
    return args


def relative(path):
    """A path inside the repository relative to it, any other by its file name: the JSON names no machine path."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else os.path.basename(path)


def build_report(args, rows):
    """The JSON document of a run: date, machine, settings, what holding each model whole would cost, the rows."""
    t5_config = load_preset(args.text_encoder, T5_PRESETS, "text encoder")
    settings = dict(stdit_config=relative(args.stdit_config), text_encoder=args.text_encoder if args.text_encoder in T5_PRESETS else relative(args.text_encoder),
                    vae=args.vae if args.vae in VAE_PRESETS else relative(args.vae), batch=args.batch, steps=args.steps,
                    default_steps=args.default_steps, micro_batch_sizes=args.micro_batch_sizes, prompt_tokens=args.prompt_tokens,
                    sampler="iddpm", cfg="one model call on the doubled batch per step", dtype="float32")
    return dict(date=datetime.date.today().isoformat(), machine=machine_description(), settings=settings,
                peak_memory="VmHWM of /proc/self/status, reset per phase through /proc/self/clear_refs; bytes",
                memory_arithmetic=memory_arithmetic(t5_config, rows[0]["stdit_parameters"], rows[0]["vae_parameters"]),
                results=rows)


def format_arithmetic(arithmetic):
    return (f"holding T5 whole: {arithmetic['t5_parameters'] / 1e9:.2f}B parameters, fp32 {arithmetic['t5_fp32'] / GB:.2f} GiB "
            f"(bf16 {arithmetic['t5_bf16'] / GB:.2f}); streamed: one block {arithmetic['t5_block_fp32'] / GB:.2f} GiB; "
            f"STDiT2 fp32 {arithmetic['stdit_fp32'] / GB:.2f} GiB, VAE {arithmetic['vae_fp32'] / GB:.2f} GiB")


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child_main(args)

    from utils.io import write_text_atomic

    rows = []
    for frames, height, width in args.sizes:
        if available_memory() < args.min_available_gb * GB:
            raise SystemExit(f"only {available_memory() / GB:.1f} GiB available, --min-available-gb {args.min_available_gb}; not starting")
        # a fresh process per size: each starts from the same memory and no size inherits another's allocator pools
        child = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]), "--child", f"{frames}x{height}x{width}"]
        result = subprocess.run(child, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{frames}x{height}x{width} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(format_table(rows[-1:], header=len(rows) == 1), flush=True)
    report = build_report(args, rows)
    print(format_arithmetic(report["memory_arithmetic"]))
    write_text_atomic(args.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {relative(args.output)}")
    return report


if __name__ == "__main__":
    main()
