"""Process-wide runtime settings for Paddle's CPU kernels.

Importing `models` or `pipelines` applies them (`configure_on_import`), so a user's own program gets the
same speed as the scripts without a set-up call; OPENSORA_CPU_RUNTIME=0 skips that. Each part keeps a value
the user set (MKL_DEBUG_CPU_TYPE, MKL_CBWR, OPENSORA_NUM_THREADS) or has its own opt-out
(OPENSORA_MALLOC_TUNING=0).
"""

import ctypes
import ctypes.util
import os
import sys

import paddle

# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks below this size come from the heap; freed heap memory up to this size stays with the process.
HEAP_RETAIN_BYTES = 1 << 30
# MKL_DEBUG_CPU_TYPE value of MKL's AVX2 code path.
MKL_AVX2 = "5"
# MKL_CBWR value: the best code path for this CPU, with results that do not depend on the thread count.
MKL_STRICT_REPRODUCIBLE = "AUTO,STRICT"


def configure_cpu_runtime():
    """Process-wide settings for Paddle's CPU kernels (MKL code path, allocator, dense transposes, threads);
    a no-op on GPU builds. Call it before any Paddle op runs.

    Returns the number of threads set, or None on GPU builds.
    """
    if paddle.device.is_compiled_with_cuda():
        return None
    select_mkl_kernels_for_amd()
    make_mkl_reproducible()
    keep_freed_memory_in_process()
    copy_on_transpose()
    return configure_cpu_threads()


def configure_on_import():
    """`configure_cpu_runtime()` unless OPENSORA_CPU_RUNTIME=0. It must run before MKL's first call, which
    importing the model package comes before in any program that uses it."""
    if os.environ.get("OPENSORA_CPU_RUNTIME", "1") == "0":
        return None
    return configure_cpu_runtime()


def copy_on_transpose():
    """Make transpose/slice/unbind produce dense tensors on the CPU instead of strided views.

    With stride kernels on (Paddle's default), a transpose is a view and the next op that needs dense input
    copies it with a generic strided-copy kernel that is an order of magnitude slower than the dedicated
    transpose kernel: making a [32, 256, 6, 32] float tensor [32, 6, 256, 32]-dense took 12.5 ms instead of
    0.18 ms, and one spatial attention of the yardstick config 71 ms instead of 25 ms. Nothing in this
    project writes through a view, so the results are the same.
    """
    paddle.set_flags({"FLAGS_use_stride_kernel": False})


def select_mkl_kernels_for_amd(cpuinfo_path="/proc/cpuinfo"):
    """Let the MKL bundled with Paddle use its AVX2 kernels on AMD CPUs.

    Paddle's CPU wheel ships MKL 2019, whose dispatcher gives non-Intel CPUs a generic code path: on this
    project's 2-core AMD EPYC an fp32 [8192, 192] x [192, 768] matmul ran at 72 GFLOP/s, and at 120 GFLOP/s
    with MKL_DEBUG_CPU_TYPE=5, its AVX2 path (PyTorch: 197). Its AVX-512 values (6, 7) are faster for
    matmul but other kernels then die with SIGILL on AMD, so only AVX2 is selected, and only when the CPU
    reports AVX2 and FMA. That MKL reads the variable at its first call, so this must run before any
    matmul. A value the user set is kept. Returns the value in effect, or None when nothing is selected.
    """
    if "MKL_DEBUG_CPU_TYPE" in os.environ:
        return os.environ["MKL_DEBUG_CPU_TYPE"]
    try:
        with open(cpuinfo_path, encoding="utf-8") as f:
            cpuinfo = f.read()
    except OSError:
        return None
    first_cpu = cpuinfo.split("\n\n", 1)[0]
    fields = dict(line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    if fields.get("vendor_id") != "AuthenticAMD":
        return None
    if not {"avx2", "fma"} <= set(fields.get("flags", "").split()):
        return None
    os.environ["MKL_DEBUG_CPU_TYPE"] = MKL_AVX2
    return MKL_AVX2


def make_mkl_reproducible():
    """Make MKL's results independent of how many threads it runs on (its "strict CNR" mode).

    By default MKL splits a matrix product's reductions by thread and may use fewer threads than asked
    when the machine is busy, so the same command with the same seed gave frames that differed by 0.3-0.9
    grey levels between a 1- and a 2-thread run (0.0 with this set). Strict mode keeps the split fixed;
    benchmarks/bench_determinism.py measures what that costs (on this project's 2-core AMD EPYC, matmuls of
    the yardstick's shapes ran within the noise of the default mode).
    Like MKL_DEBUG_CPU_TYPE it is read at MKL's first call, and a value the user set is kept (e.g.
    MKL_CBWR=AUTO for MKL's default, non-reproducible mode). Returns the value in effect.
    """
    return os.environ.setdefault("MKL_CBWR", MKL_STRICT_REPRODUCIBLE)


def keep_freed_memory_in_process():
    """Stop glibc from returning every large freed tensor buffer to the kernel.

    Paddle's CPU allocator hands each tensor to malloc. By default glibc serves blocks of a few MB and more
    with fresh mmap pages and unmaps them on free, so every activation-sized op output pays page faults and
    zero-filling: on this project's 2-core machine a bias add over 8192x576 floats took 9.2 ms instead of
    1.5 ms, a softmax over attention scores 38 ms instead of 17 ms. Keeping such blocks in the heap makes
    them reusable. Costs resident memory that is not given back between steps. Set
    OPENSORA_MALLOC_TUNING=0 to keep glibc's defaults. Returns True when applied.
    """
    if os.environ.get("OPENSORA_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_RETAIN_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * HEAP_RETAIN_BYTES))


def configure_cpu_threads():
    """Give Paddle's CPU math libraries every core this process may use.

    Importing Paddle sets OMP_NUM_THREADS=1, so its CPU BLAS/oneDNN kernels run on one thread, which halves
    matmul speed on a 2-core machine. The cores are shared evenly between the processes of a distributed
    launch; OPENSORA_NUM_THREADS overrides the count. Returns the number of threads set.
    """
    threads = os.environ.get("OPENSORA_NUM_THREADS")
    if threads is None:
        local_processes = int(os.environ.get("PADDLE_LOCAL_SIZE", os.environ.get("PADDLE_TRAINERS_NUM", "1")))
        threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_processes))
    paddle.base.core.set_num_threads(int(threads))
    return int(threads)


def quiet_library_logs():
    """paddlenlp and ppdiffusers log every file they load at INFO level; a CLI user needs only warnings,
    unless they ask for everything with --verbose (which `run_cli` turns into OPENSORA_VERBOSE=1)."""
    if os.environ.get("OPENSORA_VERBOSE") == "1":
        return
    from paddlenlp.utils.log import logger as paddlenlp_logger
    from ppdiffusers.utils import logging as ppdiffusers_logging

    paddlenlp_logger.set_level("WARNING")
    ppdiffusers_logging.set_verbosity_warning()
