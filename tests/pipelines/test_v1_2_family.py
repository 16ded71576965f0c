"""Open-Sora v1.2 models in the same pipeline and command line: a tiny STDiT3 and video VAE written in the
official layouts and converted, then every mode end to end, with the conditioned latent frames checked against
an independent encoding placed by hand (17-frame chunks, 17 -> 5 compression, v1.2's align of 5)."""

import json
import os
import subprocess
import sys

import av
import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from models.stdit.stdit3 import STDiT3, STDiT3Config
from pipelines import Conditions, OpenSoraPipeline
from pipelines.open_sora.cli import parse_args
from pipelines.open_sora.settings import OPEN_SORA_V1_2_DEFAULTS, build_scheduler, family_defaults
from scripts.convert_checkpoint import convert_stdit, convert_vae_v1_2, layer_layout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VAE_FIXTURE = os.path.join(REPO, "tests", "fixtures", "vae_v1_2_parity.npz")
PROMPT = "a red circle moving right"
NUM_FRAMES, SIZE = 20, 16  # 20 frames: a chunk of 17 (5 latent frames) and one of 3 (1 latent frame)


def official_stdit3_directory(path, caption_channels, model_max_length):
    """A hub-layout STDiT3 (the original's config.json with its bookkeeping, PyTorch weight layouts) with random
    weights everywhere, so that the conditioning is seen in its output."""
    paddle.seed(1)
    config = STDiT3Config(input_sq_size=16, hidden_size=24, depth=1, num_heads=2, mlp_ratio=2.0,
                          caption_channels=caption_channels, model_max_length=model_max_length)
    model = STDiT3(config)
    rng = np.random.default_rng(1)
    for param in model.parameters():
        if not param.numpy().any():
            param.set_value(rng.normal(0.0, 0.2, param.shape).astype("float32"))
    _, linear = layer_layout(model)
    weights = {name: value.numpy().T.copy() if name in linear else value.numpy() for name, value in model.state_dict().items()}
    path.mkdir()
    hub_config = {key: value for key, value in config.to_dict().items() if key != "gradient_checkpointing"}
    hub_config.update(architectures=["STDiT3"], model_type="STDiT3", input_size=[None, None, None], torch_dtype="float32")
    (path / "config.json").write_text(json.dumps(hub_config))
    save_file(weights, str(path / "model.safetensors"))


def official_vae_directory(path):
    """The tiny video VAE of the parity fixture in the hub layout (its config.json names the two VAEs)."""
    fixture = np.load(VAE_FIXTURE)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["VideoAutoencoderPipeline"], model_type="VideoAutoencoderPipeline", micro_frame_size=17,
        scale=[3.85, 2.32, 2.33, 3.06], shift=[-0.1, 0.34, 0.27, 0.98], freeze_vae_2d=False, cal_loss=False,
        from_pretrained=None, vae_2d=dict(type="VideoAutoencoderKL", micro_batch_size=4),
        vae_temporal=dict(type="VAE_Temporal_SD", from_pretrained=None),
    )))
    save_file({k[len("weight/"):]: fixture[k] for k in fixture.files if k.startswith("weight/")}, str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def v1_2_models(tiny_models, tmp_path_factory):
    """Converted STDiT3 and video VAE directories (no inference.json: the v1.2 sample defaults apply)."""
    root = tmp_path_factory.mktemp("v1_2")
    text_config = json.load(open(os.path.join(tiny_models["text_encoder"], "config.json")))
    official_stdit3_directory(root / "hub_stdit3", text_config["d_model"], 8)
    official_vae_directory(root / "hub_vae")
    convert_stdit("stdit3", str(root / "hub_stdit3"), str(root / "stdit3"))
    convert_vae_v1_2(str(root / "hub_vae"), str(root / "vae"), config_path=os.path.join(REPO, "configs", "vae_v1_2", "tiny.json"))
    return dict(stdit3=str(root / "stdit3"), vae=str(root / "vae"), text_encoder=tiny_models["text_encoder"])


@pytest.fixture(scope="module")
def pipe(v1_2_models):
    settings = {**family_defaults(v1_2_models["stdit3"]), "num_sampling_steps": 3}
    pipe = OpenSoraPipeline.from_component_paths(
        v1_2_models["stdit3"], v1_2_models["vae"], v1_2_models["text_encoder"], build_scheduler(settings),
        trained_size=dict(num_frames=NUM_FRAMES, height=SIZE, width=SIZE, fps=24),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def video():
    """uint8 [34, 16, 16, 3]: two chunks of 17 frames, a square moving over a gradient, distinct in every frame."""
    frames = np.zeros((34, SIZE, SIZE, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 200, SIZE, dtype=np.uint8)[None, None, :]
    for t in range(34):
        frames[t, 4:10, (t // 3) % 10 : (t // 3) % 10 + 6] = (250, 40 + 5 * t, 40)
    return frames


def encoded(pipe, seed, references):
    """Each reference encoded alone, in order, right after seeding: the draws a call makes before sampling."""
    paddle.seed(seed)
    return [pipe.vae.encode(paddle.to_tensor(frames.transpose(3, 0, 1, 2)[None].astype("float32") / 127.5 - 1.0))[0].numpy()
            for frames in references]


def test_the_family_is_read_from_the_converted_configs(v1_2_models, pipe):
    assert type(pipe.transformer).__name__ == "STDiT3" and type(pipe.vae).__name__ == "VideoAutoencoderV1_2"
    assert family_defaults(v1_2_models["stdit3"]) is OPEN_SORA_V1_2_DEFAULTS
    assert pipe.scheduler.use_timestep_transform and pipe.vae.get_latent_size([NUM_FRAMES, SIZE, SIZE]) == [6, 8, 8]
    output = pipe(PROMPT, seed=0)
    assert output.frames.shape == (1, NUM_FRAMES, SIZE, SIZE, 3) and output.fps == 24
    latents = pipe(PROMPT, seed=0, output_type="latent").frames
    assert latents.shape == [1, 4, 6, 8, 8]


# latent frame -> (reference, its latent frame), placed by hand: with align 5 a start goes to a chunk's first
# latent frame, so the connect's last image (frame 19, latent 5) stays at 5, and the last 17 frames of the
# 34-frame video (latents 5-9) fill latents 0-4.
@pytest.mark.parametrize("mode", ["image_to_video", "connect", "extend", "edit"])
def test_conditioned_latent_frames_are_the_encoded_references(pipe, video, mode):
    seed = 7
    if mode == "image_to_video":
        conditions, references, placed = Conditions.image_to_video(video[0]), [video[:1]], {0: (0, 0)}
    elif mode == "connect":
        conditions, references, placed = Conditions.connect(video[0], video[19]), [video[:1], video[19:20]], {0: (0, 0), 5: (1, 0)}
    elif mode == "extend":
        conditions, references, placed = Conditions.extend(video, num_frames=17), [video], {t: (0, 5 + t) for t in range(5)}
    else:
        conditions, references, placed = Conditions.edit(video[:NUM_FRAMES], 0.0), [video[:NUM_FRAMES]], {t: (0, t) for t in range(6)}
    latents = pipe(PROMPT, conditions=conditions, seed=seed, output_type="latent").frames.numpy()[0]
    expected = encoded(pipe, seed, references)
    for frame in range(6):
        if frame in placed:
            reference, source = placed[frame]
            np.testing.assert_array_equal(latents[:, frame], expected[reference][:, source])
        else:
            for reference, source in placed.values():
                assert np.abs(latents[:, frame] - expected[reference][:, source]).mean() > 0.1


def test_align_moves_the_last_frame_to_its_chunks_start_and_align_1_does_not(pipe, video):
    # 26 frames: chunks of 17 and 9 (8 latent frames); frame 25 is in latent 7, which align 5 moves to 5
    expected = encoded(pipe, 3, [video[:1], video[25:26]])
    for align, target, elsewhere in ((1, 7, 5), (None, 5, 7)):
        latents = pipe(PROMPT, conditions=Conditions.connect(video[0], video[25]), num_frames=26, align=align, seed=3,
                       output_type="latent").frames.numpy()[0]
        np.testing.assert_array_equal(latents[:, target], expected[1][:, 0])
        assert np.abs(latents[:, elsewhere] - expected[1][:, 0]).mean() > 0.1


def test_loops_repeat_one_chunk_of_the_previous_clip(pipe):
    output = pipe([["a red circle", "a blue square"]], loop=2, seed=0)
    assert output.frames.shape == (1, NUM_FRAMES + NUM_FRAMES - 17, SIZE, SIZE, 3)  # 17 frames: v1.2's 5 latent frames
    np.testing.assert_array_equal(output.frames[:, :NUM_FRAMES], pipe("a red circle", seed=0).frames)


def test_scores_are_appended_as_v12_was_trained():
    scores = dict(aesthetic_score=6.5, motion_score=5, camera_motion="pan left")
    assert OpenSoraPipeline.prompts_per_loop("A red circle.", 1, scores) == [
        ["a red circle. aesthetic score: 6.5. motion score: 5.0. camera motion: pan left."]]  # cleaned: lower case
    # a prompt that states a score keeps its own
    assert OpenSoraPipeline.prompts_per_loop("a red circle aesthetic score: 4.0.", 1, scores)[0][0].count("aesthetic score") == 1


def test_command_line_sizes_by_name_and_v12_defaults(v1_2_models):
    flags = ["--prompt", PROMPT, "--model-path", v1_2_models["stdit3"], "--vae-path", v1_2_models["vae"],
             "--text-encoder-path", v1_2_models["text_encoder"]]
    args = parse_args(flags, "t")
    assert (args.num_frames, args.image_size, args.sampler, args.num_sampling_steps, args.aes) == (51, [240, 426], "rflow", 30, 6.5)
    args = parse_args(flags + ["--num-frames", "4s", "--resolution", "144p", "--aspect-ratio", "1:1"], "t")
    assert (args.num_frames, args.image_size) == (102, [192, 192])
    assert parse_args(flags + ["--aspect-ratio", "16:9"], "t").image_size == [426, 240]  # 240p, portrait


def test_command_line_generates_with_a_v12_model(v1_2_models, tmp_path):
    command = [sys.executable, os.path.join(REPO, "scripts", "inference.py"), "--model-path", v1_2_models["stdit3"],
               "--vae-path", v1_2_models["vae"], "--text-encoder-path", v1_2_models["text_encoder"],
               "--num-frames", str(NUM_FRAMES), "--image-size", str(SIZE), str(SIZE), "--num-sampling-steps", "2",
               "--camera-motion", "pan right", "--save-dir", str(tmp_path), "--quiet",
               "--prompt", PROMPT + '{"reference_path": "%s", "mask_strategy": "0"}' % os.path.join(REPO, "assets", "images", "condition", os.listdir(os.path.join(REPO, "assets", "images", "condition"))[0])]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    path = result.stdout.strip().splitlines()[-1]
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert (len(frames), frames[0].shape, float(stream.average_rate)) == (NUM_FRAMES, (SIZE, SIZE, 3), 24.0)


def test_a_directory_of_the_other_family_is_named_and_a_config_without_model_type_is_an_stdit2(v1_2_models, tiny_models, tmp_path):
    from models.families import load_transformer, transformer_type
    from models.stdit.stdit2 import STDiT2
    from utils.errors import UserError

    with pytest.raises(UserError, match="an STDiT3 config, not an STDiT2 one; load it with STDiT3"):
        STDiT2.from_pretrained(v1_2_models["stdit3"])
    assert json.load(open(os.path.join(v1_2_models["stdit3"], "config.json")))["model_type"] == "STDiT3"
    assert transformer_type(os.path.join(REPO, "assets", "default_model", "transformer")) == "STDiT2"
    config = json.load(open(os.path.join(tiny_models["stdit2"], "config.json")))
    config.pop("model_type")  # a config written by hand, without it
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(tiny_models["stdit2"], "model.safetensors"), tmp_path / "model.safetensors")
    assert type(load_transformer(str(tmp_path))).__name__ == "STDiT2"
