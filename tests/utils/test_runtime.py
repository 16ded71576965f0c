import os
import subprocess
import sys

import pytest

from utils import runtime

AMD_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2 avx512f\n\nprocessor\t: 1\n"
AMD_OLD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx\n"
INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx fma avx2 avx512f\n"


@pytest.mark.parametrize("cpuinfo, expected", [(AMD_AVX2, "5"), (AMD_OLD, None), (INTEL, None)])
def test_mkl_avx2_path_only_for_amd_cpus_with_avx2(tmp_path, monkeypatch, cpuinfo, expected):
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert runtime.select_mkl_kernels_for_amd(str(path)) == expected
    assert os.environ.get("MKL_DEBUG_CPU_TYPE") == expected


def test_user_choice_of_mkl_path_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "4")
    path = tmp_path / "cpuinfo"
    path.write_text(AMD_AVX2)
    assert runtime.select_mkl_kernels_for_amd(str(path)) == "4"


def test_unreadable_cpuinfo_selects_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    assert runtime.select_mkl_kernels_for_amd(str(tmp_path / "missing")) is None


def test_malloc_tuning_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("OPENSORA_MALLOC_TUNING", "0")
    assert runtime.keep_freed_memory_in_process() is False


def test_configured_process_computes_the_same_and_uses_dense_transposes():
    """In a fresh process (the settings are process-wide): threads set, malloc tuned (glibc), stride kernels
    off, and a matmul and an attention give the same numbers as numpy."""
    code = """
import numpy as np, paddle
from utils.runtime import configure_cpu_runtime, keep_freed_memory_in_process
from models.layers.blocks import math_attention
threads = configure_cpu_runtime()
assert keep_freed_memory_in_process(), "mallopt refused the settings"
assert threads >= 1, threads
assert paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"] is False
rng = np.random.default_rng(0)
a, b = rng.standard_normal((300, 70)).astype("float32"), rng.standard_normal((70, 90)).astype("float32")
np.testing.assert_allclose(paddle.matmul(paddle.to_tensor(a), paddle.to_tensor(b)).numpy(), a @ b, rtol=1e-4, atol=1e-4)
q = rng.standard_normal((2, 6, 3, 8)).astype("float32")
out = math_attention(*[paddle.to_tensor(q)] * 3).numpy()
s = np.einsum("blhd,bmhd->bhlm", q, q) / np.sqrt(8)
w = np.exp(s - s.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
np.testing.assert_allclose(out, np.einsum("bhlm,bmhd->blhd", w, q), rtol=1e-4, atol=1e-5)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(runtime.__file__)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
