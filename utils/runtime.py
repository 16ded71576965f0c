"""Process-wide runtime settings applied once by the scripts."""

import os

import paddle


def configure_cpu_threads():
    """Give Paddle's CPU math libraries every core this process may use.

    Importing Paddle sets OMP_NUM_THREADS=1, so its CPU BLAS/oneDNN kernels run on one thread, which halves
    matmul speed on a 2-core machine. The cores are shared evenly between the processes of a distributed
    launch; OPENSORA_NUM_THREADS overrides the count. Returns the number of threads set, or None on GPU builds.
    """
    if paddle.device.is_compiled_with_cuda():
        return None
    threads = os.environ.get("OPENSORA_NUM_THREADS")
    if threads is None:
        local_processes = int(os.environ.get("PADDLE_LOCAL_SIZE", os.environ.get("PADDLE_TRAINERS_NUM", "1")))
        threads = max(1, len(os.sched_getaffinity(0)) // max(1, local_processes))
    paddle.base.core.set_num_threads(int(threads))
    return int(threads)


def quiet_library_logs():
    """paddlenlp and ppdiffusers log every file they load at INFO level; a CLI user needs only warnings."""
    from paddlenlp.utils.log import logger as paddlenlp_logger
    from ppdiffusers.utils import logging as ppdiffusers_logging

    paddlenlp_logger.set_level("WARNING")
    ppdiffusers_logging.set_verbosity_warning()
