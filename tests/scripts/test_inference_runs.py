"""Inference behaviour beyond the documented commands: determinism, loops, distributed prompts."""

import hashlib
import os
import subprocess
import sys

import av

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(args, tmp_path, launcher=(), **kwargs):
    result = subprocess.run([sys.executable, *launcher, *args, "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def frames(path):
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def test_same_seed_gives_identical_files_and_another_seed_does_not(tiny_model_flags, tmp_path):
    args = ["scripts/inference.py", "--prompt", "a red circle moving left", *tiny_model_flags]
    first = run([*args, "--save-dir", str(tmp_path / "a")], tmp_path).stdout.split()
    second = run([*args, "--save-dir", str(tmp_path / "b")], tmp_path).stdout.split()
    third = run([*args, "--save-dir", str(tmp_path / "c"), "--seed", "7"], tmp_path).stdout.split()
    assert digest(first[0]) == digest(second[0]) != digest(third[0])


def test_loop_with_prompt_per_loop_and_several_samples(tiny_model_flags, tmp_path):
    out = run(["scripts/inference-long.py", "--prompt", "|0|a red circle|1|a blue square", "--loop", "3", "--num-frames", "4",
               "--condition-frame-length", "1", "--num-sample", "2", "--sample-name", "long", "--save-dir", str(tmp_path),
               *tiny_model_flags], tmp_path).stdout.split()
    assert [os.path.basename(p) for p in out] == ["long_0-0.mp4", "long_0-1.mp4"]
    assert frames(out[0]) == 4 + 2 * 3  # the first clip plus each later clip without its conditioning frame


def test_default_condition_frame_length_for_loops(tiny_model_flags, tmp_path):
    out = run(["scripts/inference-long.py", "--prompt", "a red circle", "--loop", "2", "--num-frames", "8",
               "--save-dir", str(tmp_path), *tiny_model_flags], tmp_path).stdout.split()
    assert frames(out[0]) == 8 + 8 - 2  # default: a quarter of the clip conditions the next one


def test_prompts_are_split_across_processes(tiny_model_flags, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    run(["scripts/inference.py", "--prompt", "a red circle", "a blue square", "a green triangle", "--save-dir", str(tmp_path / "out"),
         *tiny_model_flags], tmp_path, launcher=("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs")), env=env)
    assert sorted(os.listdir(tmp_path / "out")) == ["sample_0.mp4", "sample_1.mp4", "sample_2.mp4"]
    rank0 = (tmp_path / "logs" / "workerlog.0").read_text()
    rank1 = (tmp_path / "logs" / "workerlog.1").read_text()
    assert "sample_0.mp4" in rank0 and "sample_2.mp4" in rank0 and "sample_1.mp4" in rank1


def test_two_processes_writing_into_one_directory_keep_both_results(tiny_model_flags, tmp_path):
    argv = [sys.executable, "scripts/inference.py", "--prompt", "a red circle", "--save-dir", str(tmp_path), "--quiet", *tiny_model_flags]
    processes = [subprocess.Popen(argv + ["--seed", str(seed)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    outputs = [p.communicate(timeout=300)[0].strip() for p in processes]
    assert all(p.returncode == 0 for p in processes)
    assert sorted(os.listdir(tmp_path)) == ["sample_0.mp4", "sample_0_1.mp4"] and len(set(outputs)) == 2
    assert digest(outputs[0]) != digest(outputs[1])
