"""What users reported on a fresh clone, each pinned by a test: training defaults that follow the fine-tuned
model, converter configs from any transformers version, output permissions, reproducible frames, cleaned
prompts, benchmark results without machine paths."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import av
import numpy as np
import pytest
from safetensors.numpy import save_file

from models.stdit.stdit2 import STDiT2Config
from pipelines.open_sora.cli import split_json_tail, texts_per_loop
from pipelines.open_sora.pipeline_open_sora import OpenSoraPipeline
from trainer.setup import resolve_diffusion_settings
from utils.errors import UserError
from utils.io import atomic_path, write_text_atomic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------ training defaults follow the model


def model_args(**flags):
    values = dict(sampler=None, rflow_use_timestep_transform=None, rflow_transform_scale=None, inference_cfg_scale=None,
                  rflow_sample_method="logit-normal")
    return SimpleNamespace(**{**values, **flags})


SHIPPED_DEFAULTS = dict(sampler="rflow", use_timestep_transform=True, transform_scale=6.0, cfg_scale=4.0)


def test_fine_tuning_keeps_the_objective_the_model_was_trained_with():
    settings = resolve_diffusion_settings(model_args(), STDiT2Config(pred_sigma=False), SHIPPED_DEFAULTS)
    assert (settings.sampler, settings.use_timestep_transform, settings.transform_scale, settings.cfg_scale) == ("rflow", True, 6.0, 4.0)


def test_explicit_flags_override_the_models_settings():
    settings = resolve_diffusion_settings(
        model_args(rflow_transform_scale=2.0, inference_cfg_scale=5.0), STDiT2Config(pred_sigma=False), SHIPPED_DEFAULTS
    )
    assert (settings.sampler, settings.use_timestep_transform, settings.transform_scale, settings.cfg_scale) == ("rflow", True, 2.0, 5.0)
    settings = resolve_diffusion_settings(model_args(rflow_use_timestep_transform=False), STDiT2Config(pred_sigma=False), SHIPPED_DEFAULTS)
    assert (settings.use_timestep_transform, settings.transform_scale) == (False, 1.0)  # the scale goes with the shift


@pytest.mark.parametrize("pred_sigma, sampler", [(True, "iddpm"), (False, "rflow")])
def test_a_new_model_gets_the_objective_its_output_supports(pred_sigma, sampler):
    settings = resolve_diffusion_settings(model_args(), STDiT2Config(pred_sigma=pred_sigma), {})
    assert (settings.sampler, settings.use_timestep_transform, settings.transform_scale, settings.cfg_scale) == (sampler, False, 1.0, 7.0)


def test_switching_objective_does_not_inherit_the_other_objectives_shift():
    settings = resolve_diffusion_settings(model_args(sampler="iddpm"), STDiT2Config(pred_sigma=True), SHIPPED_DEFAULTS)
    assert (settings.sampler, settings.use_timestep_transform, settings.transform_scale) == ("iddpm", False, 1.0)


@pytest.mark.parametrize("flags, pred_sigma, message", [
    (dict(sampler="iddpm"), False, "pred_sigma false"),
    (dict(sampler="rflow", rflow_use_timestep_transform=False, rflow_transform_scale=3.0), False, "has no effect"),
    (dict(sampler="iddpm", rflow_use_timestep_transform=True), True, "applies to --sampler rflow only"),
    (dict(sampler="ddim"), True, "is not supported"),
])
def test_combinations_that_cannot_train_are_refused(flags, pred_sigma, message):
    with pytest.raises(UserError, match=message):
        resolve_diffusion_settings(model_args(**flags), STDiT2Config(pred_sigma=pred_sigma), {})


# ------------------------------------------------------------------ converter


def hub_stdit2(tmp_path, extra_config):
    import paddle

    from models.stdit.stdit2 import STDiT2
    from scripts.convert_checkpoint import layer_layout

    paddle.seed(0)
    config = STDiT2Config(input_sq_size=32, hidden_size=24, depth=1, num_heads=2, mlp_ratio=2.0, caption_channels=16, model_max_length=8)
    model = STDiT2(config)
    _, linear = layer_layout(model)
    source = tmp_path / "OpenSora-STDiT-v2-stage3"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({**config.to_dict(), **extra_config}))
    save_file({name: (value.numpy().T if name in linear else value.numpy()).copy() for name, value in model.state_dict().items()},
              str(source / "model.safetensors"))
    return source


def convert(source, output):
    return subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "stdit2", str(source), str(output)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_configs_of_any_transformers_version_convert(tmp_path):
    bookkeeping = {"dtype": "float32", "transformers_version": "4.57.1", "_attn_implementation": "eager",
                   "_name_or_path": "hpcai-tech/OpenSora-STDiT-v2-stage3", "architectures": ["STDiT2"], "model_type": "STDiT2"}
    result = convert(hub_stdit2(tmp_path, bookkeeping), tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(written) == {field for field in STDiT2Config.__dataclass_fields__}


def test_a_genuinely_unknown_config_key_names_itself_without_pointing_at_the_command_being_run(tmp_path):
    result = convert(hub_stdit2(tmp_path, {"dtype": "float32", "num_experts": 8}), tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "num_experts" in result.stderr and "dtype" not in result.stderr.split("keys")[1]
    assert "convert_checkpoint.py" not in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ permissions


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_outputs_get_the_mode_the_umask_gives(tmp_path, umask):
    from safetensors.numpy import save_file as save_safetensors

    previous = os.umask(umask)
    try:
        write_text_atomic(str(tmp_path / "a.json"), "{}")
        with atomic_path(str(tmp_path / "model")) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            save_safetensors({"w": np.zeros(2, dtype=np.float32)}, os.path.join(tmp, "sub", "model.safetensors"))
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~umask
    assert os.stat(tmp_path / "model").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "model" / "sub").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "model" / "sub" / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask


def test_training_checkpoints_get_normal_permissions(tmp_path, tiny_models):
    data = os.path.join(REPO, "assets", "data", "train.csv")
    result = subprocess.run(
        [sys.executable, "scripts/trainer_opensora.py", "--do_train", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
         "--save_steps", "1", "--report_to", "none", "--pretrained_model_path", tiny_models["stdit2"], "--vae_path",
         tiny_models["vae"], "--text_encoder_path", tiny_models["text_encoder"], "--data_path", data, "--num_frames", "4",
         "--ema_decay", "0.9"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    umask = os.umask(0o022)
    os.umask(umask)
    paths = [path for path in glob.glob(str(tmp_path / "out" / "**"), recursive=True)]
    assert any(path.endswith("checkpoint-2/ema/model.safetensors") for path in paths)
    for path in paths:
        expected = 0o777 & ~umask if os.path.isdir(path) else 0o666 & ~umask
        assert os.stat(path).st_mode & 0o777 == expected, path


# ------------------------------------------------------------------ reproducible frames


def frames_of(path):
    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_the_same_command_gives_identical_frames_whatever_the_thread_count(tmp_path):
    # MKL splits its reductions by thread; with its default mode a 1- and a 2-thread run of this command
    # differed by up to 13 grey levels in a pixel. The thread count is what a busy machine changes.
    prompts = ["A beautiful sunset over the city", "a white triangle heading left on a navy background"]
    outputs = []
    for threads in ("1", "2"):
        save_dir = tmp_path / threads
        result = subprocess.run(
            [sys.executable, "scripts/inference.py", "--prompt", *prompts, "--image-size", "96", "96",
             "--num-sampling-steps", "4", "--save-dir", str(save_dir), "--quiet"],
            cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, OPENSORA_NUM_THREADS=threads),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append([frames_of(path) for path in result.stdout.split()])
    for one_thread, two_threads in zip(*outputs):
        assert np.array_equal(one_thread, two_threads)


# ------------------------------------------------------------------ prompts and results


def test_prompts_are_cleaned_as_the_original_cleans_them_before_t5():
    # the command line splits the prompts per loop; the pipeline cleans every text before T5
    texts = [texts_per_loop(split_json_tail(prompt)[0], 2) for prompt in
             ["A <b>Sunset</b> over the CITY https://example.com", '|0|A Dog|1|a  cat{"mask_strategy": "0"}']]
    assert OpenSoraPipeline.prompts_per_loop(texts, 2) == [["a sunset over the city"] * 2, ["a dog", "a cat"]]
    assert OpenSoraPipeline.prompts_per_loop("A <b>Sunset</b>", 2) == [["a sunset"] * 2]
    with pytest.raises(UserError, match="nothing is left after caption cleaning"):
        OpenSoraPipeline.prompts_per_loop([texts_per_loop("|0|a dog|1|### @@@", 2)], 2)


def test_committed_benchmark_results_hold_no_machine_paths():
    for path in glob.glob(os.path.join(REPO, "benchmarks", "results", "*.json")):
        text = open(path, encoding="utf-8").read()
        assert REPO not in text and '"/' not in text, path


@pytest.mark.parametrize("verbose", [False, True])
def test_library_loading_logs_only_with_verbose(tmp_path, tiny_model_flags, verbose):
    result = subprocess.run(
        [sys.executable, "scripts/inference.py", "--prompt", "a red circle", "--save-dir", str(tmp_path), "--quiet",
         *tiny_model_flags, *(["--verbose"] if verbose else [])],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("Loading configuration file" in result.stderr + result.stdout) == verbose
