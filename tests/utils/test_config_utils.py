import json

import pytest

from utils.config_utils import DEFAULT_MODEL_DIR, OPEN_SORA_DEFAULTS, parse_args
from utils.errors import UserError


def write_model_dir(tmp_path, defaults=None):
    model_dir = tmp_path / "stdit2"
    model_dir.mkdir()
    if defaults is not None:
        (model_dir / "inference.json").write_text(json.dumps(defaults))
    return str(model_dir)


def test_default_model_paths_and_cli_precedence(tmp_path):
    args = parse_args(["--prompt", "a red circle", "--num-frames", "5"], "test")
    assert args.model_path.startswith(DEFAULT_MODEL_DIR)
    assert args.vae_path.startswith(DEFAULT_MODEL_DIR) and args.text_encoder_path.startswith(DEFAULT_MODEL_DIR)
    assert args.num_frames == 5 and args.prompt == ["a red circle"]


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


def test_prompt_file(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("first\n\nsecond\n")
    assert parse_args(["--prompt-path", str(prompts)], "t").prompt == ["first", "second"]
    prompts.write_text("\n  \n")
    with pytest.raises(UserError, match="has no prompts"):
        parse_args(["--prompt-path", str(prompts)], "t")


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "no prompt"),
        (["--prompt", "x", "--num-frames", "0"], "--num-frames must be a positive integer"),
        (["--prompt", "x", "--image-size", "0", "64"], "--image-size 0 64"),
        (["--prompt", "x", "--image-size", "64", "100000"], "between 1 and 4096"),
        (["--prompt", "x", "--sampler", "ddim"], "invalid choice"),
        (["--prompt", "x", "--prompt-path", "/nonexistent"], None),
        (["--prompt-path", "/nonexistent/p.txt"], "file not found"),
        (["--prompt", "x", "--num-frames", "abc"], "invalid int value"),
        (["--prompt", "a", "b", "--reference-path", "r.png"], "1 entries but there are 2 prompts"),
        (["--prompt", "x", "--model-path", "m"], "--vae-path is required"),
        (["--prompt", "x", "--condition-frame-length", "16", "--num-frames", "16"], "--condition-frame-length"),
        (["--prompt", "  "], "empty prompt"),
    ],
)
def test_bad_arguments_are_one_line_user_errors(argv, message):
    if message is None:  # --prompt wins over --prompt-path, which is then not read
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
    with pytest.raises(UserError, match="unknown keys"):
        parse_args(["--prompt", "x", "--config", str(bad)], "t")


def test_timestep_shift_of_the_model_reaches_the_sampler(tmp_path):
    import types

    import paddle

    from utils.generation import build_sampler

    vae = types.SimpleNamespace(temporal_compression=1)
    argv = ["--prompt", "x", "--vae-path", "v", "--text-encoder-path", "t", "--model-path"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = build_sampler(parse_args(argv + [write_model_dir(tmp_path / "a", {"sampler": "rflow"})], "test"), vae)
    assert not plain.use_timestep_transform
    model_dir = write_model_dir(tmp_path / "b", {"sampler": "rflow", "use_timestep_transform": True, "transform_scale": 6.0})
    shifted = build_sampler(parse_args(argv + [model_dir], "test"), vae)
    # 64x64, 16 frames: shift = sqrt(64*64 / 512^2) * sqrt(16) * 6 = 3, and t' = 3t / (1 + 2t)
    size = {key: paddle.to_tensor([value]) for key, value in dict(height=64.0, width=64.0, num_frames=16.0).items()}
    t = shifted.transform(paddle.to_tensor([500.0]), size)
    assert float(t[0]) == pytest.approx(1000 * 1.5 / 2.0)
