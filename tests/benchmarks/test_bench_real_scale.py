"""benchmarks/bench_real_scale.py on small models: one generation in this process (the encoder released before
sampling, the row, the table and the JSON report), the random weights, the memory guard and the flags. The
script end to end (a parent and a child process) is the slow test."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_real_scale.py")
TINY_FLAGS = ["--stdit-config", "configs/stdit2/tiny.json", "--text-encoder", "tiny", "--vae", "tiny", "--min-available-gb", "0"]
# 8 blocks of 56 MB: large enough that holding the encoder whole (450 MB) would stand out from the noise
T5_8_BLOCKS = dict(vocab_size=1000, d_model=1024, d_ff=4096, num_layers=8, num_heads=8, d_kv=64, feed_forward_proj="gated-gelu",
                   dropout_rate=0.0)
MB = 2**20


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_real_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_generation_releases_the_encoder_and_reports(bench, tmp_path):
    """The child's work in this process: the text phase holds about one block, sampling starts with the encoder
    gone (no block alive, resident memory back near where it started); the row, table and report add up."""
    with open(os.path.join(REPO, "configs", "stdit2", "tiny.json")) as f:
        stdit_config = dict(json.load(f), caption_channels=T5_8_BLOCKS["d_model"])
    (tmp_path / "stdit2.json").write_text(json.dumps(stdit_config))
    (tmp_path / "t5.json").write_text(json.dumps(T5_8_BLOCKS))
    args = bench.parse_args(["--stdit-config", str(tmp_path / "stdit2.json"), "--text-encoder", str(tmp_path / "t5.json"),
                             "--vae", "tiny", "--sizes", "4x64x48", "--steps", "2", "--default-steps", "10",
                             "--micro-batch-sizes", "1", "0", "--output", str(tmp_path / "real_scale.json")])
    row = json.loads(json.dumps(bench.run_size(args, args.sizes[0])))  # as the child hands it to the parent

    report = bench.build_report(args, [row])
    block, whole = report["memory_arithmetic"]["t5_block_fp32"], report["memory_arithmetic"]["t5_fp32"]
    assert whole > 7 * block and report["memory_arithmetic"]["stdit_parameters"] == row["stdit_parameters"]
    assert row["peak_resettable"] and row["t5_blocks_alive_after_release"] == 0
    assert row["text_peak"] - row["rss_start"] < 3 * block, (row["text_peak"] - row["rss_start"]) / MB
    assert row["rss_after_text_release"] - row["rss_start"] < block, (row["rss_after_text_release"] - row["rss_start"]) / MB
    phase_peaks = [row["text_peak"], row["sampling_peak"], *(d["peak"] for d in row["decode"])]
    assert row["whole_peak"] >= max(phase_peaks) and min(phase_peaks) >= row["rss_start"] * 0.9

    assert (row["num_frames"], row["height"], row["width"]) == (4, 64, 48)
    assert row["latent"] == [4, 4, 8, 6] and row["tokens_per_sample"] == 4 * 4 * 3 and row["video_shape"] == [1, 3, 4, 64, 48]
    assert len(row["step_s"]) == 2 and row["steady_step_s"] == row["step_s"][1]
    assert [d["micro_batch_size"] for d in row["decode"]] == [1, "all"]
    assert row["total_uses_micro_batch_size"] == 1  # no micro-batch of 4 measured: the total uses the first
    expected = row["text_encode_s"] + row["stdit_build_s"] + row["step_s"][0] + 9 * row["steady_step_s"] + row["decode"][0]["seconds"]
    assert row["total_default_steps_s"] == pytest.approx(expected)

    header, line = bench.format_table([row]).splitlines()
    assert header.split()[:3] == ["size", "tokens", "text"] and "peak GiB" in header
    assert line.startswith("4x64x48") and "1: " in line and "all: " in line
    assert report["settings"]["text_encoder"] == "t5.json"  # outside the repository: the file name, no machine path
    assert bench.relative(os.path.join(REPO, "configs", "stdit2", "tiny.json")) == "configs/stdit2/tiny.json"
    assert {"platform", "processor", "cpus", "memory_gb", "paddle", "load_average"} <= set(report["machine"])
    assert report["date"] and "VmHWM" in report["peak_memory"] and report["results"] == [row]
    assert str(tmp_path) not in json.dumps(report)


def test_random_weights_are_seeded_per_tensor_and_row(bench):
    config = bench.T5_PRESETS["tiny"]
    a, b = bench.RandomT5Weights(config, seed=0), bench.RandomT5Weights(config, seed=0)
    name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    np.testing.assert_array_equal(a.tensor(name), b.tensor(name))
    assert not np.array_equal(a.tensor(name), bench.RandomT5Weights(config, seed=1).tensor(name))
    np.testing.assert_array_equal(a.rows("shared.weight", [7, 3]), a.tensor("shared.weight")[[7, 3]])
    # fan-in scaled: the std of a [d_ff, d_model] projection is d_ff ** -0.5
    assert a.tensor(name).std() == pytest.approx(config["d_ff"] ** -0.5, rel=0.15)
    assert a.seconds > 0


def test_memory_arithmetic_of_t5_xxl(bench):
    arithmetic = bench.memory_arithmetic(bench.T5_PRESETS["xxl"], 767_000_000, 83_653_863)
    assert arithmetic["t5_parameters"] == 4_762_310_656  # t5-v1_1-xxl's encoder (embedding counted once)
    assert arithmetic["t5_fp32"] / 2**30 == pytest.approx(17.74, abs=0.01)  # 19.0 GB
    assert arithmetic["t5_block_parameters"] == 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096


def test_memory_guard_names_the_limit(bench):
    assert "memory guard: resident" in bench.MemoryGuard(max_rss=1).problem()
    assert "machine available" in bench.MemoryGuard(max_rss=2**50, min_available=2**50).problem()
    assert bench.MemoryGuard(max_rss=2**50, min_available=0).problem() is None


def test_flags_are_checked(bench, capsys):
    assert bench.parse_size("16x240X426") == (16, 240, 426)
    with pytest.raises(argparse.ArgumentTypeError, match="expected FRAMESxHEIGHTxWIDTH"):
        bench.parse_size("16x256")
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "3", "--default-steps", "2"])
    assert "measure between 1 and --default-steps (2) steps" in capsys.readouterr().err


@pytest.mark.slow
def test_script_writes_the_table_and_json(tmp_path):
    output = tmp_path / "real_scale.json"
    result = subprocess.run([sys.executable, SCRIPT, *TINY_FLAGS, "--sizes", "4x64x48", "--steps", "2", "--default-steps", "10",
                             "--micro-batch-sizes", "1", "--output", str(output)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    header, row = result.stdout.splitlines()[:2]
    assert "peak GiB" in header and row.startswith("4x64x48")
    assert "holding T5 whole" in result.stdout and "wrote " in result.stdout
    report = json.loads(output.read_text())
    assert report["settings"]["stdit_config"] == "configs/stdit2/tiny.json"  # repository-relative, no machine path
    assert REPO not in output.read_text()
    assert [(r["num_frames"], r["height"], r["width"]) for r in report["results"]] == [(4, 64, 48)]


@pytest.mark.slow
def test_memory_guard_stops_the_run():
    result = subprocess.run([sys.executable, SCRIPT, *TINY_FLAGS, "--max-rss-gb", "0.01", "--child", "4x64x64"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3 and "memory guard" in result.stderr
