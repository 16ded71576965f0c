"""OpenSoraPipeline: every mode, the conditioned latent frames against an independent encoding of the
references, loops, callbacks, output types, saving and loading, the command line's equivalence, input checks."""

import filecmp
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from PIL import Image

from pipelines import Conditions, MaskGroup, OpenSoraPipeline
from pipelines.open_sora.settings import build_scheduler, read_model_defaults
from utils.errors import UserError
from utils.media import save_video

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "a red circle moving right"


@pytest.fixture(scope="module")
def pipeline_dir(tiny_models, tmp_path_factory):
    settings = read_model_defaults(tiny_models["stdit2"])
    pipe = OpenSoraPipeline.from_component_paths(
        tiny_models["stdit2"], tiny_models["vae"], tiny_models["text_encoder"], build_scheduler(settings),
        trained_size=dict(num_frames=settings["num_frames"], height=64, width=64, fps=settings["fps"]),
    )
    path = str(tmp_path_factory.mktemp("pipeline") / "tiny")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    pipe = OpenSoraPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def video():
    """uint8 [6, 64, 64, 3]: a bright square moving right over a gradient, distinct in every frame."""
    frames = np.zeros((6, 64, 64, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 200, 64, dtype=np.uint8)[None, None, :]
    for t in range(6):
        frames[t, 20:36, 4 + 8 * t : 20 + 8 * t] = (250, 40, 40)
    return frames


def encoded(pipe, seed, frames):
    """The latents the pipeline must place for references given as uint8 frames: the same posterior draw,
    since a call encodes its references first, right after seeding."""
    paddle.seed(seed)
    latents = []
    for reference in frames:
        x = paddle.to_tensor(reference.transpose(3, 0, 1, 2)[None].astype("float32") / 127.5 - 1.0)
        latents.append(pipe.vae.encode(x)[0].numpy())
    return latents


def test_defaults_come_from_the_directory(pipe):
    assert pipe.default_size == dict(num_frames=4, height=64, width=64, fps=8)
    assert pipe.default_sampling == dict(num_inference_steps=2, guidance_scale=4.0)
    output = pipe(PROMPT, seed=0)
    assert output.frames.shape == (1, 4, 64, 64, 3) and output.frames.dtype == np.uint8 and output.fps == 8
    assert output.frames.std() > 1  # the tiny model is random but not constant


def test_same_seed_same_frames_and_the_global_random_state_is_kept(pipe):
    paddle.seed(123)
    expected_draw = paddle.rand([3]).numpy()
    paddle.seed(123)
    first = pipe(PROMPT, seed=5).frames
    assert np.array_equal(paddle.rand([3]).numpy(), expected_draw)
    assert np.array_equal(pipe(PROMPT, seed=5).frames, first)
    assert not np.array_equal(pipe(PROMPT, seed=6).frames, first)
    assert not np.array_equal(pipe("a blue square moving up", seed=5).frames, first)


@pytest.mark.parametrize("mode", ["image_to_video", "connect", "extend", "edit"])
def test_conditioned_latent_frames_are_the_encoded_references(pipe, video, mode):
    seed = 11
    if mode == "image_to_video":
        conditions, references, placed = Conditions.image_to_video(video[0]), [video[:1]], {0: (0, 0)}
    elif mode == "connect":
        conditions, references, placed = Conditions.connect(video[0], Image.fromarray(video[5])), [video[:1], video[5:6]], {0: (0, 0), 3: (1, 0)}
    elif mode == "extend":
        conditions, references, placed = Conditions.extend(video, num_frames=2), [video], {0: (0, 4), 1: (0, 5)}
    else:
        conditions, references = Conditions.edit(video[:4], edit_ratio=0.0), [video[:4]]
        placed = {t: (0, t) for t in range(4)}
    latents = pipe(PROMPT, conditions=conditions, seed=seed, output_type="latent").frames.numpy()[0]
    expected = encoded(pipe, seed, references)
    for frame in range(4):
        if frame in placed:
            reference, source = placed[frame]
            np.testing.assert_array_equal(latents[:, frame], expected[reference][:, source])
        else:  # generated frames are far from every placed reference frame
            for reference, source in placed.values():
                assert np.abs(latents[:, frame] - expected[reference][:, source]).mean() > 0.1


def test_edit_ratio_sets_how_far_the_frames_move(pipe, video):
    reference = encoded(pipe, 3, [video[:4]])[0]
    # with 10 steps a frame of edit ratio r is regenerated over the steps with t <= r * T
    changes = [np.abs(pipe(PROMPT, conditions=Conditions.edit(video[:4], ratio), seed=3, num_inference_steps=10,
                           output_type="latent").frames.numpy()[0] - reference).mean()
               for ratio in (0.0, 0.3, 0.9)]
    assert changes[0] == 0 and changes[0] < changes[1] < changes[2]


def test_references_are_resized_and_cropped_once_to_the_generation_size(pipe, video, tmp_path):
    wide = np.concatenate([video[0], video[0]], axis=1)  # 64 x 128: centre-cropped after resizing
    path = str(tmp_path / "wide.png")
    Image.fromarray(wide).save(path)
    from_file = pipe(PROMPT, conditions=Conditions.image_to_video(path), seed=2, output_type="latent").frames.numpy()
    from_array = pipe(PROMPT, conditions=Conditions.image_to_video(wide), seed=2, output_type="latent").frames.numpy()
    np.testing.assert_array_equal(from_file, from_array)


def test_loops_chain_clips_and_repeat_the_end_of_the_previous_one(pipe):
    calls = []

    def count_steps(pipeline, step_index, timestep, callback_kwargs):
        calls.append(step_index)
        return callback_kwargs

    output = pipe([["a red circle", "a blue square"]], loop=2, condition_frame_length=1, seed=0, callback_on_step_end=count_steps)
    assert output.frames.shape == (1, 4 + 3, 64, 64, 3)
    assert calls == list(range(4)) and pipe.num_timesteps == 4
    one_loop = pipe("a red circle", seed=0).frames
    np.testing.assert_array_equal(output.frames[:, :4], one_loop)


def test_callback_can_replace_the_latents(pipe):
    def zero_at_the_end(pipeline, step_index, timestep, callback_kwargs):
        if step_index == pipeline.num_timesteps - 1:
            return {"latents": paddle.zeros_like(callback_kwargs["latents"])}
        return callback_kwargs

    latents = pipe(PROMPT, seed=0, output_type="latent", callback_on_step_end=zero_at_the_end).frames
    assert float(latents.abs().max()) == 0.0


def test_batches_several_videos_per_prompt_and_pil_output(pipe):
    output = pipe(["a red circle", "a blue square"], seed=1, num_videos_per_prompt=2)
    assert output.frames.shape == (4, 4, 64, 64, 3)
    # prompt-major: the first draw of each prompt is what a single-video call gives
    single = pipe(["a red circle", "a blue square"], seed=1).frames
    np.testing.assert_array_equal(output.frames[[0, 2]], single)
    assert not np.array_equal(output.frames[0], output.frames[1])
    images = pipe("a red circle", seed=1, output_type="pil").frames
    assert len(images) == 1 and len(images[0]) == 4 and images[0][0].size == (64, 64)
    np.testing.assert_array_equal(np.asarray(images[0][2]), single[0, 2])


def test_save_and_load_give_the_same_frames(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"]
    copy = OpenSoraPipeline.from_pretrained(str(tmp_path / "copy"))
    copy.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(copy(PROMPT, seed=4).frames, pipe(PROMPT, seed=4).frames)


def test_the_command_line_writes_what_the_api_returns(pipeline_dir, pipe, tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/inference.py", "--model-path", pipeline_dir, "--prompt", PROMPT, "--seed", "9",
         "--save-dir", str(tmp_path / "cli"), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = pipe(PROMPT, seed=9)
    api_file = save_video(output.frames[0], output.fps, str(tmp_path / "api"))
    assert filecmp.cmp(result.stdout.strip(), api_file, shallow=False)


@pytest.mark.parametrize("call,message", [
    (dict(height=60), "multiples of 8"),
    (dict(num_frames=0), "num_frames must be a positive integer"),
    (dict(output_type="mp4"), "output_type 'mp4'"),
    (dict(loop=2, output_type="latent"), "use loop=1"),
    (dict(loop=2, condition_frame_length=4), "condition_frame_length 4"),
    (dict(conditions=[None, None]), "2 conditions for 1 prompts"),
    (dict(conditions=Conditions([np.zeros((64, 64, 3), np.uint8)], [MaskGroup(target_start=5)])), "do not fit in a clip of 4"),
    (dict(conditions=Conditions([np.zeros((64, 64, 3), np.uint8)], [MaskGroup(loop=1)])), "loop 1 is not generated"),
    (dict(callback_on_step_end="print"), "must be callable"),
    (dict(seed="42"), "seed must be an integer"),
    (dict(guidance_scale="7"), "guidance_scale must be a number"),
])
def test_bad_calls_are_one_line_errors(pipe, call, message):
    with pytest.raises(UserError, match=message):
        pipe(PROMPT, **call)


def test_conditions_refuse_what_cannot_be_placed():
    with pytest.raises(UserError, match="reference 1 does not exist"):
        Conditions([np.zeros((8, 8, 3), np.uint8)], [MaskGroup(reference=1)])
    with pytest.raises(UserError, match="edit_ratio 2"):
        MaskGroup(edit_ratio=2)
    with pytest.raises(UserError, match="uint8 frames"):
        Conditions([np.zeros((8, 8), np.float32)])
    with pytest.raises(UserError, match="nowhere.png: file not found"):
        Conditions.image_to_video("nowhere.png")
    with pytest.raises(UserError, match="nothing is left after caption cleaning"):
        OpenSoraPipeline.prompts_per_loop("http://example.com", 1)


def test_save_pipeline_script_assembles_a_loadable_directory(tiny_models, pipe, tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/save_pipeline.py", "--model-path", tiny_models["stdit2"], "--vae-path", tiny_models["vae"],
         "--text-encoder-path", tiny_models["text_encoder"], "--output-dir", str(tmp_path / "assembled")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assembled = OpenSoraPipeline.from_pretrained(str(tmp_path / "assembled"))
    assembled.set_progress_bar_config(disable=True)
    assert assembled.default_size == pipe.default_size and assembled.default_sampling == pipe.default_sampling
    np.testing.assert_array_equal(assembled(PROMPT, seed=8).frames, pipe(PROMPT, seed=8).frames)


def test_attention_cache_is_on_for_the_call_only_and_changes_little(pipe):
    full = pipe(PROMPT, seed=4, num_inference_steps=8, output_type="latent").frames.numpy()
    seen = []

    def record(pipeline, step_index, timestep, callback_kwargs):
        seen.append(pipeline.transformer.attention_cache)
        return callback_kwargs

    cached = pipe(PROMPT, seed=4, num_inference_steps=8, output_type="latent", attention_cache="fast",
                  callback_on_step_end=record).frames.numpy()
    cache = seen[0]
    assert all(item is cache for item in seen) and sum(cache.reused.values()) > 0
    assert pipe.transformer.attention_cache is None  # the pipeline's model is left as it was
    assert not np.array_equal(cached, full)
    assert np.abs(cached - full).mean() < 0.5 * np.abs(full).mean()
    np.testing.assert_array_equal(pipe(PROMPT, seed=4, num_inference_steps=8, output_type="latent").frames.numpy(), full)
    with pytest.raises(UserError, match="attention cache 'fastest': not a preset"):
        pipe(PROMPT, attention_cache="fastest")


def test_dpm_solver_scheduler_keeps_hard_conditions_and_round_trips(pipe, pipeline_dir, video, tmp_path):
    from schedulers.dpm_solver import DPMSolver

    solver_pipe = OpenSoraPipeline.from_pretrained(pipeline_dir, scheduler=DPMSolver(num_sampling_steps=3, cfg_scale=4.0))
    solver_pipe.set_progress_bar_config(disable=True)
    latents = solver_pipe(PROMPT, conditions=Conditions.image_to_video(video[0]), seed=2, output_type="latent").frames.numpy()[0]
    np.testing.assert_array_equal(latents[:, 0], encoded(solver_pipe, 2, [video[:1]])[0][:, 0])
    assert solver_pipe.num_timesteps == 3
    solver_pipe.save_pretrained(str(tmp_path / "dpm"))
    reloaded = OpenSoraPipeline.from_pretrained(str(tmp_path / "dpm"))
    assert type(reloaded.scheduler).__name__ == "DPMSolver" and reloaded.scheduler.config == solver_pipe.scheduler.config
