"""The inference command line (pipelines/open_sora/cli.py): where each setting comes from, what is refused
before any model loads, and the original prompt syntax (JSON tails, loop prompts, mask strategies) with
errors that quote what the user wrote."""

import argparse
import json
import os
import re

import numpy as np
import paddle
import pytest

from pipelines.open_sora.cli import load_pipeline, parse_args, parse_mask_strategy, plan_jobs, split_json_tail, texts_per_loop
from pipelines.open_sora.conditioning import MaskGroup
from pipelines.open_sora.pipeline_open_sora import save_scheduler
from pipelines.open_sora.settings import DEFAULT_MODEL_DIR, OPEN_SORA_DEFAULTS, build_scheduler, is_pipeline_dir
from schedulers.iddpm import IDDPM
from schedulers.rflow import RFLOW
from utils.errors import UserError
from utils.media import save_video


def write_model_dir(tmp_path, defaults=None):
    """An STDiT2 directory as the trainer writes it: only inference.json matters before loading."""
    model_dir = tmp_path / "stdit2"
    model_dir.mkdir()
    if defaults is not None:
        (model_dir / "inference.json").write_text(json.dumps(defaults))
    return str(model_dir)


def write_pipeline_dir(tmp_path, scheduler, **index):
    """A pipeline directory as far as the command line reads it: model_index.json and the scheduler config."""
    pipeline_dir = tmp_path / "pipeline"
    pipeline_dir.mkdir()
    (pipeline_dir / "model_index.json").write_text(json.dumps({"_class_name": "OpenSoraPipeline", **index}))
    save_scheduler(scheduler, str(pipeline_dir / "scheduler"))
    return str(pipeline_dir)


def read_json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------- where values come from


def test_the_shipped_pipeline_is_the_default_model_with_its_own_settings():
    args = parse_args(["--prompt", "a red circle", "--num-frames", "5"], "test")
    assert args.model_path == DEFAULT_MODEL_DIR and is_pipeline_dir(args.model_path)
    # read here from the files themselves, not through the code under test
    index = read_json(DEFAULT_MODEL_DIR, "model_index.json")
    scheduler = read_json(DEFAULT_MODEL_DIR, "scheduler", "scheduler_config.json")
    assert scheduler["_class_name"] == "RFLOW"
    assert (args.image_size, args.fps, args.frame_interval) == ([index["height"], index["width"]], index["fps"], index["frame_interval"])
    assert (args.sampler, args.num_sampling_steps, args.cfg_scale, args.use_timestep_transform, args.transform_scale) == (
        "rflow", scheduler["num_sampling_steps"], scheduler["cfg_scale"], scheduler["use_timestep_transform"],
        scheduler["transform_scale"])
    assert args.trained_size == (index["num_frames"], [index["height"], index["width"]])
    assert args.num_frames == 5 and args.prompt == ["a red circle"]  # the command line wins


def test_model_inference_json_then_config_file_then_cli(tmp_path):
    model_dir = write_model_dir(tmp_path, {"num_frames": 8, "sampler": "rflow", "num_sampling_steps": 30, "fps": 8})
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"num_sampling_steps": 10, "seed": 7}))
    argv = ["--prompt", "x", "--model-path", model_dir, "--vae-path", "v", "--text-encoder-path", "t",
            "--config", str(config), "--seed", "9"]
    args = parse_args(argv, "test")
    assert (args.num_frames, args.sampler, args.fps) == (8, "rflow", 8)  # from the model
    assert args.num_sampling_steps == 10  # from --config
    assert args.seed == 9  # from the command line
    assert args.image_size == OPEN_SORA_DEFAULTS["image_size"]
    assert args.trained_size is None  # inference.json without a size: nothing to warn about


def test_a_model_without_settings_gets_the_open_sora_defaults(tmp_path):
    args = parse_args(["--prompt", "x", "--model-path", write_model_dir(tmp_path), "--vae-path", "v", "--text-encoder-path", "t"], "t")
    assert {key: getattr(args, key) for key in OPEN_SORA_DEFAULTS} == OPEN_SORA_DEFAULTS


def test_a_pipeline_directory_gives_its_size_and_scheduler_and_needs_no_component_paths(tmp_path):
    scheduler = RFLOW(num_sampling_steps=12, cfg_scale=5.0, use_timestep_transform=True, transform_scale=3.0)
    model_dir = write_pipeline_dir(tmp_path, scheduler, num_frames=8, height=32, width=48, fps=6, frame_interval=2)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"num_sampling_steps": 10, "fps": 12}))
    args = parse_args(["--prompt", "x", "--model-path", model_dir, "--config", str(config), "--fps", "4"], "test")
    assert (args.num_frames, args.image_size, args.frame_interval, args.trained_size) == (8, [32, 48], 2, (8, [32, 48]))
    assert (args.sampler, args.cfg_scale, args.use_timestep_transform, args.transform_scale) == ("rflow", 5.0, True, 3.0)
    assert (args.num_sampling_steps, args.fps) == (10, 4)  # --config over the model, the command line over both


def test_a_pipeline_directory_with_an_iddpm_scheduler(tmp_path):
    model_dir = write_pipeline_dir(tmp_path, IDDPM(num_sampling_steps=20, cfg_scale=6.0, cfg_channel=3))
    args = parse_args(["--prompt", "x", "--model-path", model_dir], "test")
    assert (args.sampler, args.num_sampling_steps, args.cfg_scale, args.cfg_channel) == ("iddpm", 20, 6.0, 3)
    assert args.trained_size is None and args.num_frames == OPEN_SORA_DEFAULTS["num_frames"]  # no size recorded


@pytest.mark.parametrize("flag", ["--vae-path", "--text-encoder-path"])
def test_component_paths_are_not_silently_ignored_with_a_pipeline_directory(tmp_path, flag):
    missing = str(tmp_path / "missing")  # honoured (not found) or refused: either way the user hears of it
    with pytest.raises(UserError, match=re.escape(missing)):
        load_pipeline(parse_args(["--prompt", "x", flag, missing], "t"))


def test_prompt_file(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first\n\nsecond\n")
    assert parse_args(["--prompt-path", str(prompts)], "t").prompt == ["first", "second"]
    prompts.write_text("\n  \n")
    with pytest.raises(UserError, match="has no prompts"):
        parse_args(["--prompt-path", str(prompts)], "t")
    prompts.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        parse_args(["--prompt-path", str(prompts)], "t")


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "no prompt"),
        (["--prompt", "x", "--num-frames", "0"], "--num-frames must be a positive integer"),
        (["--prompt", "x", "--image-size", "0", "64"], "--image-size 0 64"),
        (["--prompt", "x", "--image-size", "64", "100000"], "between 1 and 4096"),
        (["--prompt", "x", "--image-size", "64", "4096"], None),
        (["--prompt", "x", "--sampler", "ddim"], "invalid choice"),
        (["--prompt", "x", "--prompt-path", "/nonexistent"], None),
        (["--prompt-path", "/nonexistent/p.txt"], "file not found"),
        (["--prompt", "x", "--num-frames", "abc"], r"--num-frames 'abc' is neither a frame count nor one of \['1x'"),
        (["--prompt", "x", "--num-frames", "4s"], None),
        (["--prompt", "x", "--resolution", "250p"], r"--resolution '250p' is not one of \['64px', '144p'"),
        (["--prompt", "x", "--aspect-ratio", "5:7"], r"--aspect-ratio '5:7' is not one of \['3:8'"),
        (["--prompt", "x", "--resolution", "240p", "--image-size", "64", "64"], "either --image-size or --resolution"),
        (["--prompt", "x", "--camera-motion", "spin"], r"--camera-motion 'spin' is not one of \['pan right'"),
        (["--prompt", "x", "--align", "0"], "--align must be a positive number of latent frames"),
        (["--prompt", "a", "b", "--reference-path", "r.png"], "--reference-path has 1 entries but there are 2 prompts"),
        (["--prompt", "a", "b", "--mask-strategy", "0", "0", "0"], "--mask-strategy has 3 entries but there are 2 prompts"),
        (["--prompt", "x", "--model-path", "{tmp}/none"], "model directory not found"),
        (["--prompt", "x", "--model-path", "{tmp}"], "--vae-path is required"),
        (["--prompt", "x", "--model-path", "{tmp}", "--vae-path", "v"], "--text-encoder-path is required"),
        (["--prompt", "x", "--condition-frame-length", "16", "--num-frames", "16"], "--condition-frame-length"),
        (["--prompt", "x", "--condition-frame-length", "15", "--num-frames", "16"], None),
        (["--prompt", "x", "--sampler", "iddpm", "--num-sampling-steps", "1"], "at least 2 with --sampler iddpm"),
        (["--prompt", "x", "--micro-batch-size", "0"], "--micro-batch-size must be a positive integer"),
        (["--prompt", "  "], "empty prompt"),
    ],
)
def test_bad_arguments_are_one_line_user_errors(argv, message, tmp_path):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    if message is None:  # accepted; --prompt wins over --prompt-path, which is then not read
        parse_args(argv, "t")
        return
    with pytest.raises(UserError, match=message) as error:
        parse_args(argv, "t")
    assert "\n" not in str(error.value)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        parse_args(["--prompt", "x", "--config", str(bad)], "t")
    bad.write_text(json.dumps({"num_frame": 3}))
    with pytest.raises(UserError, match=r"unknown keys \['num_frame'\]"):
        parse_args(["--prompt", "x", "--config", str(bad)], "t")
    bad.write_text(json.dumps({"num_frames": 0}))
    with pytest.raises(UserError, match="--num-frames must be a positive integer, got 0"):
        parse_args(["--prompt", "x", "--config", str(bad)], "t")


def test_timestep_shift_of_the_model_reaches_the_sampler(tmp_path):
    argv = ["--prompt", "x", "--vae-path", "v", "--text-encoder-path", "t", "--model-path"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # the scheduler the command line builds (load_pipeline) from the resolved arguments
    plain = build_scheduler(vars(parse_args(argv + [write_model_dir(tmp_path / "a", {"sampler": "rflow"})], "test")))
    assert not plain.use_timestep_transform
    model_dir = write_model_dir(tmp_path / "b", {"sampler": "rflow", "use_timestep_transform": True, "transform_scale": 6.0})
    shifted = build_scheduler(vars(parse_args(argv + [model_dir], "test")))
    # 64x64, 16 frames: shift = sqrt(64*64 / 512^2) * sqrt(16) * 6 = 3, and t' = 3t / (1 + 2t)
    size = {key: paddle.to_tensor([value]) for key, value in dict(height=64.0, width=64.0, num_frames=16.0).items()}
    t = shifted.transform(paddle.to_tensor([500.0]), size, 16)
    assert float(t[0]) == pytest.approx(1000 * 1.5 / 2.0)


# ------------------------------------------------------------------------------------- prompt syntax


def test_split_json_tail():
    assert split_json_tail('A sunrise.{"reference_path": "a.png;b.png","mask_strategy": "0;0,1,0,-1,1"}') == (
        "A sunrise.", {"reference_path": "a.png;b.png", "mask_strategy": "0;0,1,0,-1,1"})
    assert split_json_tail("plain") == ("plain", {})
    assert split_json_tail('x{"mask_strategy": "0"}') == ("x", {"mask_strategy": "0"})


@pytest.mark.parametrize("prompt,message", [
    ('x{"reference_path": "a.png"', "malformed"),
    ('x{"reference_path": "a.png", "strength": 1}', r"unknown keys \['strength'\]"),
    ('x{"mask_strategy": 0}', "mask_strategy must be a string, got 0"),
    ("x{[1, 2]}", "malformed"),
])
def test_json_tail_errors_name_the_prompt(prompt, message):
    with pytest.raises(UserError, match=message) as error:
        split_json_tail(prompt)
    assert "prompt 'x" in str(error.value)


def test_loop_prompts():
    assert texts_per_loop("|0|a dog|2|a cat", 4) == ["a dog", "a dog", "a cat", "a cat"]
    assert texts_per_loop("|0|a dog|1|a cat|3|a cow", 4) == ["a dog", "a cat", "a cat", "a cow"]
    assert texts_per_loop("a bird", 2) == ["a bird", "a bird"]
    assert texts_per_loop("|0|a dog", 1) == ["a dog"]
    for bad in ("|1|a dog", "|0|a|0|b", "|0|a|x|b", "|0|a|4|b", "|0|a|2", "|0|a|2|b|1|c"):
        with pytest.raises(UserError, match="prompt '"):
            texts_per_loop(bad, 4)


# ------------------------------------------------------------------------------------- mask strategies


@pytest.mark.parametrize("strategy,expected", [
    ("0", [MaskGroup(0, 0, 0, 0, 1, 0.0)]),
    ("0;0,1,0,-1,1", [MaskGroup(0, 0, 0, 0, 1, 0.0), MaskGroup(0, 1, 0, -1, 1, 0.0)]),
    ("0,0,0,-6,6", [MaskGroup(0, 0, 0, -6, 6, 0.0)]),
    ("0,0,0,0,7,0.4", [MaskGroup(0, 0, 0, 0, 7, 0.4)]),
    ("0,0,0,0,8,0.3", [MaskGroup(0, 0, 0, 0, 8, 0.3)]),
    ("0,0,0,0,1;0,0,0,-1,1", [MaskGroup(0, 0, 0, 0, 1, 0.0), MaskGroup(0, 0, 0, -1, 1, 0.0)]),
    ("2,1,-4,0,4", [MaskGroup(2, 1, -4, 0, 4, 0.0)]),
    (" 1 , 1 ,2,3 ", [MaskGroup(1, 1, 2, 3, 1, 0.0)]),
])
def test_parse_documented_strategies(strategy, expected):
    assert parse_mask_strategy(strategy, num_references=2) == expected


@pytest.mark.parametrize("strategy,message", [
    ("0,0,0,0,1,0,9", ('^mask_strategy group 1 "0,0,0,0,1,0,9": needs 1 to 6 comma-separated fields '
                       "loop_id,m_id,m_ref_start,m_target_start,m_length,edit_ratio$")),
    ("", '^mask_strategy group 1 "": needs 1 to 6'),
    ("0;", '^mask_strategy group 2 "": needs 1 to 6'),
    ("0,a", r'^mask_strategy group 1 "0,a": fields must be numbers \(five integers, then edit_ratio\)$'),
    ("0,0,0,0,1.5", "must be numbers"),  # m_length is an integer
    ("0,0,0,0,0", '^mask_strategy group 1 "0,0,0,0,0": the length must be at least 1$'),
    ("0,0,0,0,1,1.5", r'^mask_strategy group 1 "0,0,0,0,1,1.5": edit_ratio 1.5 must lie in \[0, 1\]$'),
    ("0,0,0,0,1,-0.1", r"edit_ratio -0.1 must lie in \[0, 1\]"),
    ("0;-1,0", '^mask_strategy group 2 "-1,0": the loop and reference indices must not be negative$'),
    ("0,-1", '^mask_strategy group 1 "0,-1": the loop and reference indices must not be negative$'),
    ("0;0,2", r'^mask_strategy group 2 "0,2": m_id 2 has no reference \(2 given: 0\.\.1\)$'),
])
def test_bad_strategies_name_group_and_rule(strategy, message):
    with pytest.raises(UserError, match=message):
        parse_mask_strategy(strategy, num_references=2)


def test_limits_of_the_parsing_rules():
    # the fields, in order: loop_id, m_id, m_ref_start, m_target_start, m_length, edit_ratio
    group = parse_mask_strategy("3,1,-2,5,4,0.25", num_references=2)[0]
    assert (group.loop, group.reference, group.source_start, group.target_start, group.length, group.edit_ratio) == (3, 1, -2, 5, 4, 0.25)
    assert parse_mask_strategy("0,0,0,0,1,1.0", num_references=1)[0].edit_ratio == 1.0  # regenerate completely: allowed
    assert parse_mask_strategy("0,0,0,0,1,0", num_references=1)[0].edit_ratio == 0.0
    assert parse_mask_strategy("0,1", num_references=2)[0].reference == 1  # the last reference
    with pytest.raises(UserError, match=r'group 1 "0,1": m_id 1 has no reference \(1 given: 0\.\.0\)'):
        parse_mask_strategy("0,1", num_references=1)


# ------------------------------------------------------------------------------------- planned jobs


@pytest.fixture(scope="module")
def four_frames(tmp_path_factory):
    """A reference video of 4 frames."""
    frames = np.stack([np.full((16, 16, 3), 60 * t, np.uint8) for t in range(4)])
    return save_video(frames, fps=8, save_path=str(tmp_path_factory.mktemp("reference") / "four"))


def job_args(prompt, num_frames=4, loop=1, reference_path=None, mask_strategy=None):
    prompts = prompt if isinstance(prompt, list) else [prompt]
    return argparse.Namespace(prompt=prompts, num_frames=num_frames, loop=loop, reference_path=reference_path,
                              mask_strategy=mask_strategy)


def with_tail(text, reference_path, mask_strategy=None):
    info = {"reference_path": reference_path, **({"mask_strategy": mask_strategy} if mask_strategy is not None else {})}
    return text + json.dumps(info)


def test_jobs_carry_the_loop_texts_and_the_conditions_of_each_prompt(four_frames):
    prompts = [with_tail("|0|a dog|1|a cat", four_frames, "0,0,0,-2,2;1,0,0,0,1"), "a bird"]
    jobs = plan_jobs(job_args(prompts, loop=2))
    assert [job.index for job in jobs] == [0, 1]
    assert jobs[0].texts == ["a dog", "a cat"] and jobs[1].texts == ["a bird", "a bird"]
    assert [reference.num_frames for reference in jobs[0].conditions.references] == [4]
    assert jobs[0].conditions.mask_groups == (MaskGroup(target_start=-2, length=2), MaskGroup(loop=1))
    assert jobs[1].conditions.references == () and jobs[1].conditions.mask_groups == ()


def test_a_reference_without_a_strategy_conditions_the_first_frame(four_frames):
    jobs = plan_jobs(job_args(with_tail("a dog", f"{four_frames};{four_frames}")))
    assert len(jobs[0].conditions.references) == 2 and jobs[0].conditions.mask_groups == (MaskGroup(),)


def test_json_tails_override_the_per_prompt_flags_and_empty_flags_mean_none(four_frames):
    args = job_args(["a dog" + json.dumps({"mask_strategy": "0,0,0,-1,1"}), "a cat", "a cow"],
                    reference_path=[four_frames, four_frames, ""], mask_strategy=["0,0,0,1,2", "", ""])
    jobs = plan_jobs(args)
    assert jobs[0].conditions.mask_groups == (MaskGroup(target_start=-1),)
    assert jobs[1].conditions.mask_groups == (MaskGroup(),)
    assert jobs[2].conditions.references == () and jobs[2].conditions.mask_groups == ()


@pytest.mark.parametrize("strategy,num_frames,loop,message", [
    ("0,0,0,0,4;0,0,1,0,4", 4, 1,
     r'^mask_strategy group 2 "0,0,1,0,4": frames 1\.\.4 are outside reference 0, which has 4 frame\(s\)$'),
    ("0,0,0,-2,3", 4, 1, r'^mask_strategy group 1 "0,0,0,-2,3": target frames 2\.\.4 do not fit in a clip of 4 frames$'),
    ("0,0,0,0,4,0.4", 3, 1, r"target frames 0\.\.3 do not fit in a clip of 3 frames"),
    ("0,0,-5,0,2", 4, 1, r'^mask_strategy group 1 "0,0,-5,0,2": frames -1\.\.0 are outside reference 0'),
    ("0;1,0", 4, 1, r'^mask_strategy group 2 "1,0": loop 1 is not generated \(1 loop\(s\)\)$'),
    ("0,0,0,0,4", 4, 1, None),  # exactly the whole reference and clip
    ("0,0,-4,0,1", 4, 1, None),  # the first frame, counted from the end
    ("0;1,0,0,-1,1", 4, 2, None),
])
def test_groups_must_fit_the_reference_and_the_clip(four_frames, strategy, num_frames, loop, message):
    args = job_args(with_tail("a dog", four_frames, strategy), num_frames=num_frames, loop=loop)
    if message is None:
        plan_jobs(args)
        return
    with pytest.raises(UserError, match=message):
        plan_jobs(args)


def test_what_plan_jobs_refuses_before_any_model_loads(four_frames):
    with pytest.raises(UserError, match=r"^prompt 0: mask_strategy '0' needs a reference_path$"):
        plan_jobs(job_args("a dog", mask_strategy=["0"]))
    with pytest.raises(UserError, match=r"reference nowhere\.png: file not found"):
        plan_jobs(job_args(with_tail("a dog", "nowhere.png")))
    with pytest.raises(UserError, match=r'group 1 "0,1": m_id 1 has no reference \(1 given'):
        plan_jobs(job_args(with_tail("a dog", four_frames, "0,1")))
    with pytest.raises(UserError, match="nothing is left after caption cleaning"):
        plan_jobs(job_args(["a dog", "|0|a cat|1|### @@@"], loop=2))
    with pytest.raises(UserError, match="loop ids"):
        plan_jobs(job_args("|0|a dog|1|a cat", loop=1))


def test_dpm_solver_and_attention_cache_flags(tmp_path):
    (tmp_path / "iddpm").mkdir()
    (tmp_path / "rflow").mkdir()
    iddpm_model = write_model_dir(tmp_path / "iddpm", {"sampler": "iddpm", "num_sampling_steps": 100})
    args = parse_args(["--prompt", "x", "--model-path", iddpm_model, "--vae-path", "v", "--text-encoder-path", "t",
                       "--sampler", "dpm-solver", "--attention-cache", "balanced"], "t")
    assert (args.sampler, args.num_sampling_steps, args.attention_cache) == ("dpm-solver", 20, "balanced")
    scheduler = build_scheduler(vars(args))
    assert type(scheduler).__name__ == "DPMSolver" and scheduler.num_inference_steps == 20
    assert parse_args(["--prompt", "x", "--model-path", iddpm_model, "--vae-path", "v", "--text-encoder-path", "t",
                       "--sampler", "dpm-solver", "--num-sampling-steps", "12"], "t").num_sampling_steps == 12
    rflow_model = write_model_dir(tmp_path / "rflow", {"sampler": "rflow"})
    with pytest.raises(UserError, match="--sampler dpm-solver solves the IDDPM process, but .* was trained with rectified flow"):
        parse_args(["--prompt", "x", "--model-path", rflow_model, "--vae-path", "v", "--text-encoder-path", "t",
                    "--sampler", "dpm-solver"], "t")
    with pytest.raises(UserError, match="invalid choice: 'fastest'"):
        parse_args(["--prompt", "x", "--attention-cache", "fastest"], "t")
