"""Every shell command of README.md and of the seed documentation (the earlier Paddle port's, our compatibility
contract), run as written.

The commands are read from the documents' ```bash blocks, so the documents cannot drift from the code. A command
is changed only by appending an output location and speed flags (`--save-dir`, `--num-sampling-steps 2`,
`--output_dir`, `--max_steps 2 --logging_steps 1`), by giving `paddle.distributed.launch` two CPU processes instead of `--gpus`,
and by pointing placeholder paths (`path/to/`, `my_videos/`) at inputs the test builds. The few commands that
cannot run on this machine are listed in NOT_RUN with the reason, and every entry there must still be documented.
"""

import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
from safetensors.numpy import save_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
SEED_COPY = os.path.join(REPO, "tests", "fixtures", "seed_documentation.md")
SEED_DIR = os.path.join(os.path.dirname(REPO), "shared", "seeds")
TEST_COMMAND = 'python -m pytest -q -m "not slow"'
SETUP_BY_CI = "run by .ci/run, which sets up a fresh virtual environment from README's requirements files"
NOT_RUN = {
    "python -m venv .venv": SETUP_BY_CI,
    ". .venv/bin/activate": SETUP_BY_CI,
    "pip install -r requirements.txt": SETUP_BY_CI,
    "pip install -r requirements-test.txt": SETUP_BY_CI,
    TEST_COMMAND: "README's test command: CI runs it (this test is part of it)",
    "git clone https://github.com/PaddlePaddle/PaddleMIX": "the seed's checkout of its own repository; this repository is the checkout",
    "python -m pip install paddlepaddle-gpu==2.6.1.post120 -f https://www.paddlepaddle.org.cn/whl/linux/mkl/avx/stable.html":
        "a CUDA build of Paddle; this CPU machine uses requirements.txt's paddlepaddle",
    "cd PaddleMIX/ppdiffusers": "the seed's repository layout",
    "pip install -e .": "installs the seed's ppdiffusers from source; requirements.txt pins the released one",
    "cd examples/Open-Sora/": "the seed's repository layout",
    "wget https://bj.bcebos.com/paddlenlp/models/community/tsaiyue/OpenSoraData/OpenSoraData.tar.gz":
        "a download (no network here); assets/data ships sample clips that training uses by default",
    "tar -xzvf OpenSoraData.tar.gz": "unpacks the download above",
}
ENVIRONMENT = re.compile(r"^(export\s+)?[A-Za-z_][A-Za-z0-9_]*=\S*$")


# ------------------------------------------------------------------------------------------- reading


def bash_blocks(path):
    """The commands of each ```bash block: continuation lines joined, comments and blank lines dropped."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands = [line.strip() for line in body.replace("\\\n", " ").splitlines()]
        commands = [re.sub(r"\s+", " ", command) for command in commands if command and not command.startswith("#")]
        blocks.append(commands)
    return blocks


def documented_blocks():
    """(id, commands) of every bash block of README and the seed documentation."""
    blocks = []
    for name, path in (("readme", README), ("seed", SEED_COPY)):
        for number, commands in enumerate(bash_blocks(path)):
            blocks.append((f"{name}-{number}", commands))
    return blocks


def documented_block_params():
    """The blocks as test parameters; the v1.2 conversion is slow (it converts a VAE of the released size, 393M
    parameters, because the original's VAE config does not say its sizes)."""
    return [pytest.param(block_id, commands, id=block_id,
                         marks=[pytest.mark.slow] if any("vae-v1.2" in command for command in commands) else [])
            for block_id, commands in documented_blocks()]


def steps(commands):
    """Split a block into (environment lines, commands to run); `a && b` chains are split into their parts."""
    environment, runnable = [], []
    for command in commands:
        for part in (part.strip() for part in command.split(" && ")):
            if ENVIRONMENT.match(part):
                environment.append(part)
            elif part not in NOT_RUN:
                runnable.append(part)
    return environment, runnable


# ------------------------------------------------------------------------------------------- inputs


def official_layout(model, rename=lambda key: key):
    """A Paddle model's weights as the PyTorch original stores them (Linear weights transposed)."""
    from scripts.convert_checkpoint import layer_layout

    _, linear = layer_layout(model)
    return {rename(name): (value.numpy().T if name in linear else value.numpy()).copy() for name, value in model.state_dict().items()}


def write_hub_directory(directory, model, config, weights_name="model.safetensors"):
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(official_layout(model), os.path.join(directory, weights_name))


def read_config(directory):
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def write_official_checkpoints(tiny_models, root, commands):
    """Tiny models in the layouts the hub has (STDiT2 with a current transformers' config, diffusers VAE, HF T5),
    and the v1.2 ones when `commands` name them."""
    from paddlenlp.transformers import T5EncoderModel
    from ppdiffusers import AutoencoderKL

    from models.stdit.stdit2 import STDiT2

    # The official STDiT2 learns sigma (the README command samples it with its default, IDDPM).
    model = STDiT2(dataclasses.replace(STDiT2.from_pretrained(tiny_models["stdit2"]).config, pred_sigma=True))
    config = {**model.config.to_dict(), "architectures": ["STDiT2"], "model_type": "STDiT2", "dtype": "float32",
              "transformers_version": "4.57.1", "input_size": [None, None, None]}
    write_hub_directory(os.path.join(root, "OpenSora-STDiT-v2-stage3"), model, config)
    write_hub_directory(
        os.path.join(root, "sd-vae-ft-ema"), AutoencoderKL.from_pretrained(tiny_models["vae"]),
        {**read_config(tiny_models["vae"]), "_diffusers_version": "0.30.0"}, "diffusion_pytorch_model.safetensors",
    )
    t5 = os.path.join(root, "t5-v1_1-xxl")
    write_hub_directory(
        t5, T5EncoderModel.from_pretrained(tiny_models["text_encoder"]),
        {**read_config(tiny_models["text_encoder"]), "architectures": ["T5ForConditionalGeneration"]},
    )
    shutil.copy(os.path.join(tiny_models["text_encoder"], "spiece.model"), t5)
    if any("OpenSora-STDiT-v3" in command for command in commands):
        write_official_v1_2_checkpoints(tiny_models, root)


def write_official_v1_2_checkpoints(tiny_models, root):
    """A tiny STDiT3 with the hub's config bookkeeping, and a random VAE of the released sizes in the original's
    layout (its config.json names its parts, not their sizes, so the converter assumes the released ones)."""
    import paddle

    from models.stdit.stdit3 import STDiT3, STDiT3Config
    from models.vae.vae_v1_2 import VideoAutoencoderV1_2, VideoAutoencoderV1_2Config

    text = read_config(tiny_models["text_encoder"])
    model = STDiT3(STDiT3Config(input_sq_size=64, hidden_size=24, depth=1, num_heads=2, mlp_ratio=2.0,
                                caption_channels=text["d_model"], model_max_length=8))
    config = {**model.config.to_dict(), "architectures": ["STDiT3"], "dtype": "float32", "transformers_version": "4.57.1",
              "input_size": [None, None, None]}
    write_hub_directory(os.path.join(root, "OpenSora-STDiT-v3"), model, config)
    paddle.seed(0)
    vae = VideoAutoencoderV1_2(VideoAutoencoderV1_2Config.from_json_file(os.path.join(REPO, "configs", "vae_v1_2", "official.json")))
    directory = os.path.join(root, "OpenSora-VAE-v1.2")
    os.makedirs(directory)
    weights = official_layout(vae)
    weights.update(scale=np.array(vae.config.scale, np.float32), shift=np.array(vae.config.shift, np.float32))
    save_file(weights, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(architectures=["VideoAutoencoderPipeline"], model_type="VideoAutoencoderPipeline", micro_frame_size=17,
                       scale=vae.config.scale, shift=vae.config.shift, freeze_vae_2d=False, cal_loss=False, from_pretrained=None,
                       vae_2d=dict(type="VideoAutoencoderKL", from_pretrained="PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
                                   subfolder="vae", micro_batch_size=4, local_files_only=False),
                       vae_temporal=dict(type="VAE_Temporal_SD", from_pretrained=None)), f)


def write_user_videos(root):
    """A folder of the user's clips (copies of sample clips) and a captions CSV, as make_meta.py expects."""
    videos = os.path.join(root, "my_videos")
    os.makedirs(videos)
    rows = ["path,text"]
    for number, source in enumerate(sorted(glob.glob(os.path.join(REPO, "assets", "data", "videos", "train", "*.mp4")))[:3]):
        shutil.copy(source, os.path.join(videos, f"clip{number}.mp4"))
        rows.append(f"clip{number}.mp4,a clip number {number}")
    with open(os.path.join(root, "captions.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


# ------------------------------------------------------------------------------------------- running


def flag_values(argv, flag, count=1):
    if flag not in argv:
        return None
    index = argv.index(flag)
    return argv[index + 1 : index + 1 + count]


def prepare(command, tmp):
    """The command as run here, and what it must produce: (command, check)."""
    argv = shlex.split(command)
    script = next((arg for arg in argv if arg.startswith("scripts/")), None)
    if script in ("scripts/inference.py", "scripts/inference-long.py"):
        command = command.replace("path/to/", f"{tmp}/sources/").replace(" converted/", f" {tmp}/converted/")
        save_dir = os.path.join(tmp, f"samples{len(os.listdir(tmp))}")
        return f"{command} --save-dir {save_dir} --num-sampling-steps 2", lambda result: check_video(argv, save_dir, result)
    if script == "scripts/trainer_opensora.py":
        command = re.sub(r'--gpus "[^"]*"', f"--nproc_per_node 2 --log_dir {tmp}/launch_log", command)
        output_dir = os.path.join(tmp, "exp_output")
        return f"{command} --output_dir {output_dir} --max_steps 2 --logging_steps 1", lambda result: check_training(argv, output_dir, tmp, result)
    if script == "scripts/make_meta.py":
        write_user_videos(tmp)
        meta = os.path.join(tmp, "my_videos", "meta.csv")
        appended = f"--video-dir {tmp}/my_videos/ --captions {tmp}/captions.csv --output {meta}"
        return f"{command} {appended}", lambda result: check_meta(meta)
    if script == "scripts/convert_checkpoint.py":
        command = command.replace("path/to/", f"{tmp}/sources/").replace(" converted/", f" {tmp}/converted/")
        kind, output = shlex.split(command)[2], shlex.split(command)[-1]
        return command, lambda result: check_converted(kind, output, result)
    raise AssertionError(f"documented command not understood by this test; run it here or add it to NOT_RUN: {command}")


def check_video(argv, save_dir, result):
    from utils import aspect

    frames = aspect.num_frames((flag_values(argv, "--num-frames") or ["16"])[0])  # the shipped model's default length
    if flag_values(argv, "--resolution"):
        height, width = aspect.image_size(flag_values(argv, "--resolution")[0], (flag_values(argv, "--aspect-ratio") or ["9:16"])[0])
    else:
        # The pipeline rounds sizes down to the shipped VAE's downsampling (one halving per level after the first).
        with open(os.path.join(REPO, "assets/default_model/vae/config.json")) as f:
            factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        height, width = [int(v) // factor * factor for v in flag_values(argv, "--image-size", 2) or ["64", "64"]]
    path = os.path.join(save_dir, f"{(flag_values(argv, '--sample-name') or ['sample'])[0]}_0.mp4")
    assert result.stdout.split() == [path]
    with av.open(path) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert (len(decoded), *decoded[0].shape) == (frames, height, width, 3)
    assert "INFO" not in result.stderr  # the libraries' loading logs stay hidden without --verbose
    assert np.std(np.stack(decoded)) > 1.0  # not a blank video
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~current_umask())
    # The shipped model (16 frames of 64x64) warns at other sizes; converted official weights do not.
    expect_warning = "--model-path" not in argv and (frames, height, width) != (16, 64, 64)
    assert ("was trained on" in result.stderr) == expect_warning


def check_training(argv, output_dir, tmp, result):
    from visualdl import LogReader

    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
    with open(os.path.join(output_dir, "inference.json")) as f:
        assert json.load(f)["sampler"] == "rflow"  # followed the shipped model it fine-tunes
    log = open(os.path.join(tmp, "launch_log", "workerlog.0")).read()
    assert "internal error" not in log and "Traceback" not in log
    if "--fp16" in argv:
        assert log.count("--fp16 needs a GPU") == 1
    if flag_values(argv, "--report_to") in (["all"], ["visualdl"]):
        (record,) = glob.glob(os.path.join(output_dir, "runs", "*", "vdlrecords.*.log"))
        reader = LogReader(file_path=record)
        losses = [point.value for point in reader.get_data("scalar", "train/loss")]
        assert len(losses) == 2 and all(np.isfinite(losses))  # one point per step
        assert "hparam" in reader.get_tags()["hyper_parameters"]


def check_meta(meta):
    with open(meta) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("path,text") and len(lines) == 4


def check_converted(kind, output, result):
    assert result.stdout.split() == [output] and "INFO" not in result.stderr
    expected = {"stdit2": "model.safetensors", "stdit3": "model.safetensors", "vae": "config.json", "vae-v1.2": "config.json",
                "t5": "config.json"}[kind]
    assert os.path.isfile(os.path.join(output, expected))
    for name in os.listdir(output):
        assert os.stat(os.path.join(output, name)).st_mode & 0o777 == 0o666 & ~current_umask(), name


def current_umask():
    from utils.io import current_umask as read_umask

    return read_umask()


@pytest.mark.parametrize("block_id, commands", documented_block_params())
def test_documented_block_runs_as_written(block_id, commands, tmp_path, tiny_models):
    environment, runnable = steps(commands)
    if not runnable:
        return
    if any("path/to/" in command for command in runnable):
        write_official_checkpoints(tiny_models, str(tmp_path / "sources"), runnable)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for command in runnable:
        command, check = prepare(command, str(tmp_path))
        script = "\n".join([*environment, command])
        # the released-size v1.2 VAE decodes on CPU for many minutes
        timeout = 3600 if "vae_v1_2" in command else 900
        result = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        check(result)


def test_every_not_run_command_is_still_documented_and_ci_runs_the_test_command():
    documented = {part.strip() for _, commands in documented_blocks() for command in commands for part in command.split(" && ")}
    assert set(NOT_RUN) <= documented, sorted(set(NOT_RUN) - documented)
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = f.read()
    assert TEST_COMMAND in ci and "-r requirements.txt -r requirements-test.txt" in ci


def test_seed_copy_matches_the_shared_seed_documentation():
    seeds = sorted(glob.glob(os.path.join(SEED_DIR, "*")))
    if not seeds:
        pytest.skip("the shared seed documentation is not next to this checkout (CI); the copy is tested above")
    with open(seeds[0], encoding="utf-8") as f, open(SEED_COPY, encoding="utf-8") as copy:
        assert f.read() == copy.read()
