"""Every user mistake gets one line on stderr naming the problem, exit code 2, no traceback, no output."""

import json
import os
import subprocess
import sys

import pytest

from pipelines.open_sora.cli import run_inference
from utils.errors import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "a red circle"


def ref(path, strategy="0"):
    return f'{PROMPT}{{"reference_path": "{path}", "mask_strategy": "{strategy}"}}'


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    (root / "cut.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 50)
    (root / "prompts.txt").write_text("\n\n")
    (root / "a_file").write_text("x")
    # a model directory whose weights do not match its config
    broken = root / "mismatch"
    shutil_copy(tiny_models["stdit2"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["hidden_size"] = 48
    (broken / "config.json").write_text(json.dumps(config))
    return root


def shutil_copy(source, target):
    import shutil

    shutil.copytree(source, target)


CASES = [
    # (name, extra argv, expected message)
    ("malformed json", ["--prompt", PROMPT + '{"reference_path": "x.png"'], "JSON after the text is malformed"),
    ("unknown json key", ["--prompt", PROMPT + '{"strength": "1"}'], "unknown keys"),
    ("too many fields", ["--prompt", ref("assets/images/condition/wave.png", "0,0,0,0,1,0,1")], "1 to 6"),
    ("not a number", ["--prompt", ref("assets/images/condition/wave.png", "0,x")], "must be numbers"),
    ("reference index", ["--prompt", ref("assets/images/condition/wave.png", "0,1")], "m_id 1 has no reference"),
    ("past the end of the clip", ["--prompt", ref("assets/videos/d0_proc.mp4", "0,0,0,0,10"), "--num-frames", "8"], "target frames 0..9 do not fit in a clip of 8 frames"),
    ("past the end of the reference", ["--prompt", ref("assets/videos/d0_proc.mp4", "0,0,0,0,20"), "--num-frames", "24"], "outside reference 0"),
    ("edit ratio", ["--prompt", ref("assets/images/condition/wave.png", "0,0,0,0,1,1.2")], "edit_ratio 1.2"),
    ("missing reference", ["--prompt", ref("nowhere.png")], "file not found"),
    ("directory reference", ["--prompt", ref("assets")], "is a directory"),
    ("empty reference", ["--prompt", ref("{bad}/empty.png")], "the file is empty"),
    ("not an image", ["--prompt", ref("{bad}/text.png")], "not a readable image"),
    ("truncated video", ["--prompt", ref("{bad}/cut.mp4")], "not a readable image or video"),
    ("zero size", ["--prompt", PROMPT, "--image-size", "0", "64"], "between 1 and 4096"),
    ("negative size", ["--prompt", PROMPT, "--image-size", "-8", "64"], "between 1 and 4096"),
    ("huge size", ["--prompt", PROMPT, "--image-size", "64", "100000"], "between 1 and 4096"),
    ("zero frames", ["--prompt", PROMPT, "--num-frames", "0"], "--num-frames must be a positive integer"),
    ("unknown sampler", ["--prompt", PROMPT, "--sampler", "euler"], "invalid choice"),
    ("one iddpm step", ["--prompt", PROMPT, "--sampler", "iddpm", "--num-sampling-steps", "1"], "at least 2 with --sampler iddpm"),
    ("empty prompt file", ["--prompt-path", "{bad}/prompts.txt"], "has no prompts"),
    ("missing model", ["--prompt", PROMPT, "--model-path", "{bad}/none"], "model directory not found; give a directory written by save_pretrained"),
    ("wrong model type", ["--prompt", PROMPT, "--model-path", "{vae}"], "not an STDiT2 directory"),
    ("mismatched weights", ["--prompt", PROMPT, "--model-path", "{bad}/mismatch"], "weights do not match the STDiT2 config"),
    ("missing vae", ["--prompt", PROMPT, "--vae-path", "{bad}/none"], "VAE (AutoencoderKL) directory not found"),
    ("text encoder is a vae", ["--prompt", PROMPT, "--text-encoder-path", "{vae}"], "not a T5 text encoder"),
    # the test T5 is paddlenlp's default .pdparams
    ("streamed text encoder not safetensors", ["--prompt", PROMPT, "--stream-text-encoder"],
     "the streamed T5 encoder reads safetensors weights (model.safetensors or model.safetensors.index.json) and this "
     "directory has none; convert the checkpoint with scripts/convert_checkpoint.py t5"),
    ("save dir is a file", ["--prompt", PROMPT, "--save-dir", "{bad}/a_file"], "--save-dir"),
    ("fp16 on cpu", ["--prompt", PROMPT, "--dtype", "fp16"], "needs a GPU"),
]


@pytest.mark.parametrize("name,argv,message", CASES, ids=[case[0] for case in CASES])
def test_inference_bad_input(name, argv, message, bad_files, tiny_models, tmp_path, capsys):
    paths = dict(bad=str(bad_files), vae=tiny_models["vae"])
    argv = [a.replace("{bad}", paths["bad"]).replace("{vae}", paths["vae"]) for a in argv]
    base = {"--model-path": tiny_models["stdit2"], "--vae-path": tiny_models["vae"], "--text-encoder-path": tiny_models["text_encoder"]}
    for flag, value in base.items():
        if flag not in argv:
            argv += [flag, value]
    if "--save-dir" not in argv:
        argv += ["--save-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda a: run_inference(a, "test"), ["--num-sampling-steps", "2", *argv, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_subprocess_error_has_no_traceback_and_debug_shows_it(tmp_path):
    argv = [sys.executable, "scripts/inference-long.py", "--prompt", PROMPT + '{"bad": "1"}', "--save-dir", str(tmp_path)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: prompt 'a red circle")
    debug = subprocess.run(argv + ["--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert os.listdir(tmp_path) == []


def test_training_bad_csv_is_one_line(tmp_path, tiny_models):
    csv = tmp_path / "meta.csv"
    csv.write_text("path,text\nx.mp4,hello\n")
    result = subprocess.run(
        [sys.executable, "scripts/trainer_opensora.py", "--do_train", "--output_dir", str(tmp_path / "out"), "--data_path", str(csv),
         "--pretrained_model_path", tiny_models["stdit2"], "--vae_path", tiny_models["vae"], "--text_encoder_path", tiny_models["text_encoder"]],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 2 and "missing columns" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--model_config", "configs/stdit2/demo.json", "--pretrained_model_path", "{stdit2}"], "pass only one of them"),
    (["--rflow_use_timestep_transform", "false", "--rflow_transform_scale", "6"], "has no effect without --sampler rflow --rflow_use_timestep_transform true"),
    (["--sampler", "iddpm"], "has pred_sigma false"),
    (["--sampler", "rflow", "--rflow_sample_method", "gaussian"], "--rflow_sample_method 'gaussian' is not one of"),
    (["--report_to", "tensorbored"], "--report_to tensorbored: not one of"),
    (["--data_path", "/nonexistent/meta.csv"], "/nonexistent/meta.csv: meta CSV not found"),
    (["--bucket_config", "/nonexistent/buckets.json"], "/nonexistent/buckets.json"),
    (["--mask_ratios", "[0.5]"], "--mask_ratios"),
])
def test_training_refuses_contradictory_flags(tmp_path, tiny_models, flags, message):
    flags = [flag.replace("{stdit2}", tiny_models["stdit2"]) for flag in flags]
    result = subprocess.run(
        [sys.executable, "scripts/trainer_opensora.py", "--do_train", "--output_dir", str(tmp_path / "out"), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # One line and nothing else: refused before any model was loaded (loading would log) or anything created.
    assert result.stdout == "" and result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr
    assert not os.path.exists(tmp_path / "out")
