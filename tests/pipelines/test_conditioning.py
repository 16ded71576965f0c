"""Conditions of a generation (pipelines/open_sora/conditioning.py): mask groups and their spans in pixel and
latent frames, references, the latent frames and frame masks they fix (against hand-computed tables), and how
loops condition each clip on the end of the one before."""

import os
import re
import types

import numpy as np
import paddle
import pytest
from PIL import Image

from pipelines.open_sora.conditioning import (
    Conditions,
    EncodedConditions,
    MaskGroup,
    MaskGroupError,
    Reference,
    fill_conditioned_frames,
    latent_span,
)
from pipelines.open_sora.pipeline_open_sora import OpenSoraPipeline
from pipelines.open_sora.settings import build_scheduler, read_model_defaults
from models.vae.vae import VideoAutoencoderKL
from models.vae.vae_v1_2 import VideoAutoencoderV1_2, VideoAutoencoderV1_2Config
from utils.errors import UserError
from utils.media import encode_mp4

# An image VAE's frame-to-latent map (frames are encoded one by one), without building a VAE.
FRAME_VAE = types.SimpleNamespace(latent_frame_index=VideoAutoencoderKL.latent_frame_index)

# ------------------------------------------------------------------------------------- mask groups


@pytest.mark.parametrize("fields,problem", [
    (dict(loop=-1), "the loop and reference indices must not be negative"),
    (dict(reference=-1), "the loop and reference indices must not be negative"),
    (dict(length=0), "the length must be at least 1"),
    (dict(edit_ratio=1.5), r"edit_ratio 1.5 must lie in \[0, 1\]"),
    (dict(edit_ratio=-0.1), r"edit_ratio -0.1 must lie in \[0, 1\]"),
])
def test_mask_group_rules(fields, problem):
    with pytest.raises(MaskGroupError, match=f"^MaskGroup.*: {problem}$") as error:
        MaskGroup(**fields)
    assert isinstance(error.value, UserError)
    assert error.value.group.__dict__ == {**MaskGroup().__dict__, **fields}


def test_mask_group_limits_are_allowed():
    assert MaskGroup() == MaskGroup(0, 0, 0, 0, 1, 0.0)
    MaskGroup(edit_ratio=1.0)  # regenerate completely
    MaskGroup(source_start=-3, target_start=-3, length=1)  # negative starts count from the end


@pytest.mark.parametrize("group,reference_length,clip_length,expected", [
    (MaskGroup(), 1, 5, (0, 0)),
    (MaskGroup(length=4), 4, 4, (0, 0)),  # exactly the whole reference and clip
    (MaskGroup(source_start=-4), 4, 4, (0, 0)),  # the first frame, counted from the end
    (MaskGroup(target_start=-1), 1, 5, (0, 4)),
    (MaskGroup(source_start=-3, target_start=-3, length=3), 6, 5, (3, 2)),
    (MaskGroup(source_start=2, target_start=1, length=2), 6, 5, (2, 1)),
])
def test_span_resolves_negative_starts(group, reference_length, clip_length, expected):
    assert group.span(reference_length, clip_length) == expected


@pytest.mark.parametrize("group,problem", [
    (MaskGroup(source_start=1, length=4), r"^frames 1\.\.4 are outside reference 0, which has 4 frame\(s\)$"),
    (MaskGroup(source_start=-5, length=2), r"^frames -1\.\.0 are outside reference 0, which has 4 frame\(s\)$"),
    (MaskGroup(reference=1, source_start=4), r"^frames 4\.\.4 are outside reference 1, which has 4 frame\(s\)$"),
    (MaskGroup(target_start=-2, length=3), r"^target frames 2\.\.4 do not fit in a clip of 4 frames$"),
    (MaskGroup(target_start=-5), r"^target frames -1\.\.-1 do not fit in a clip of 4 frames$"),
    (MaskGroup(target_start=4), r"^target frames 4\.\.4 do not fit in a clip of 4 frames$"),
])
def test_span_names_the_frames_that_do_not_exist(group, problem):
    with pytest.raises(MaskGroupError) as error:
        group.span(4, 4)
    assert error.value.group is group
    assert re.match(problem, error.value.problem), error.value.problem


@pytest.mark.parametrize("group,reference_length,clip_length,expected", [
    (MaskGroup(), 1, 16, (0, 0, 1)),
    (MaskGroup(source_start=-3, target_start=2, length=3), 6, 5, (3, 2, 3)),
    (MaskGroup(target_start=-1), 1, 16, (0, 15, 1)),
])
def test_latent_span_with_an_image_vae_is_the_pixel_span(group, reference_length, clip_length, expected):
    assert latent_span(group, reference_length, clip_length, FRAME_VAE) == expected


# ------------------------------------------------------------------------------------- references


@pytest.fixture
def media(tmp_path):
    image = tmp_path / "ref.png"
    Image.fromarray(np.full((30, 60, 3), 255, dtype=np.uint8)).save(image)
    frames = np.stack([np.full((40, 40, 3), 20 * t, dtype=np.uint8) for t in range(6)])
    video = tmp_path / "ref.mp4"
    video.write_bytes(encode_mp4(frames, 8))
    return str(image), str(video)


def test_references_from_files(media):
    image, video = media
    assert Reference(image).num_frames == 1 and Reference(video).num_frames == 6
    x = Reference(image).pixels(16, 16)
    assert x.shape == (3, 1, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x, np.ones_like(x), atol=0.02)
    v = Reference(video).pixels(16, 24)
    assert v.shape == (3, 6, 16, 24) and -1.0 <= v.min() and v.max() <= 1.0
    assert np.all(np.diff(v.mean(axis=(0, 2, 3))) > 0)  # frames in order
    np.testing.assert_allclose(v[:, 0], np.full_like(v[:, 0], -1.0), atol=0.05)  # the black first frame


def test_references_from_images_and_arrays():
    frames = np.zeros((2, 8, 16, 3), np.uint8)
    frames[:, :, :8] = (255, 0, 0)  # left half red
    frames[1] //= 2
    video = Reference(frames)
    assert video.num_frames == 2 and Reference(video).num_frames == 2 and Reference(video).source is video.source
    pixels = video.pixels(8, 16)
    np.testing.assert_allclose(pixels[:, 0, 0, 0], [1.0, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(pixels[:, 0, 0, 15], [-1.0, -1.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(pixels[0, 1, 0, 0], 127 / 127.5 - 1.0, atol=1e-6)
    image = Reference(frames[0])
    assert image.num_frames == 1 and image.pixels(8, 16).shape == (3, 1, 8, 16)
    pil = Reference(Image.fromarray(frames[0]).convert("L"))  # converted to RGB when read
    assert pil.num_frames == 1 and pil.pixels(8, 16).shape == (3, 1, 8, 16)


@pytest.mark.parametrize("source,message", [
    (np.zeros((8, 8), np.uint8), r"reference array of shape \(8, 8\) and dtype uint8"),
    (np.zeros((8, 8, 3), np.float32), "dtype float32: give uint8 frames"),
    (np.zeros((2, 8, 8, 4), np.uint8), r"shape \(2, 8, 8, 4\)"),
    ("nowhere.png", r"^reference nowhere\.png: file not found$"),
])
def test_bad_references(source, message):
    with pytest.raises(UserError, match=message):
        Reference(source)


# ------------------------------------------------------------------------------------- conditions


def test_conditions_place_the_first_reference_first_by_default():
    image = np.zeros((8, 8, 3), np.uint8)
    assert Conditions().references == () and Conditions().mask_groups == ()
    conditions = Conditions([image, image])
    assert len(conditions.references) == 2 and conditions.mask_groups == (MaskGroup(),)
    assert all(isinstance(reference, Reference) for reference in conditions.references)
    assert Conditions.image_to_video(image).mask_groups == (MaskGroup(),)


def test_conditions_of_each_mode():
    video = np.zeros((6, 8, 8, 3), np.uint8)
    image = np.zeros((8, 8, 3), np.uint8)
    connect = Conditions.connect(image, image)
    assert connect.mask_groups == (MaskGroup(reference=0), MaskGroup(reference=1, target_start=-1))
    extend = Conditions.extend(video, num_frames=2)
    assert extend.mask_groups == (MaskGroup(source_start=-2, length=2),) and extend.references[0].num_frames == 6
    edit = Conditions.edit(video[:4], edit_ratio=0.3)
    assert edit.mask_groups == (MaskGroup(length=4, edit_ratio=0.3),)
    for conditions in (connect, extend, edit):
        conditions.check(num_frames=4, num_loops=1)


def test_conditions_check_every_group_against_its_reference_the_clip_and_the_loops():
    four = np.zeros((4, 8, 8, 3), np.uint8)
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(MaskGroupError, match=r"reference 2 does not exist \(2 given\)"):
        Conditions([four, image], [MaskGroup(reference=2)])
    Conditions([four, image], [MaskGroup(length=4), MaskGroup(reference=1, target_start=-1)]).check(4, 1)
    late = MaskGroup(reference=0, source_start=1, length=4)
    with pytest.raises(MaskGroupError) as error:
        Conditions([four, image], [MaskGroup(), late]).check(4, 1)
    assert error.value.group is late and error.value.problem == "frames 1..4 are outside reference 0, which has 4 frame(s)"
    with pytest.raises(MaskGroupError, match=r"frames 0\.\.1 are outside reference 1, which has 1 frame"):
        Conditions([four, image], [MaskGroup(reference=1, length=2)]).check(4, 1)
    with pytest.raises(MaskGroupError, match="do not fit in a clip of 3 frames"):
        Conditions([four], [MaskGroup(length=4)]).check(3, 1)
    second_loop = Conditions([four], [MaskGroup(loop=1)])
    second_loop.check(4, 2)
    with pytest.raises(MaskGroupError, match=r"loop 1 is not generated \(1 loop\(s\)\)"):
        second_loop.check(4, 1)


# ------------------------------------------------------------------------------------- conditioned frames


def reference_latents(*lengths, channels=2):
    """Reference latents [C, T, 1, 1] whose values are 100 * (reference id + 1) + frame index."""
    return [paddle.to_tensor(np.stack([np.full((channels, 1, 1), 100 * (r + 1) + t, dtype="float32") for t in range(n)], axis=1))
            for r, n in enumerate(lengths)]


@pytest.mark.parametrize("groups,lengths,frames,expected_mask,expected_values", [
    ([MaskGroup()], (1,), 5, [0, 1, 1, 1, 1], {0: 100}),  # "0": image condition
    ([MaskGroup(), MaskGroup(reference=1, target_start=-1)], (1, 1), 5, [0, 1, 1, 1, 0], {0: 100, 4: 200}),  # connect
    ([MaskGroup(target_start=-3, length=3)], (6,), 5, [1, 1, 0, 0, 0], {2: 100, 3: 101, 4: 102}),  # first 3 frames into the end
    ([MaskGroup(source_start=-3, length=3)], (6,), 5, [0, 0, 0, 1, 1], {0: 103, 1: 104, 2: 105}),  # extend: last 3 frames first
    ([MaskGroup(length=5, edit_ratio=0.4)], (6,), 5, [0.4] * 5, {i: 100 + i for i in range(5)}),  # edit
    ([MaskGroup(source_start=2, target_start=1, length=2, edit_ratio=0.25)], (6,), 5, [1, 0.25, 0.25, 1, 1], {1: 102, 2: 103}),
    ([MaskGroup(length=2), MaskGroup(target_start=1)], (3,), 5, [0, 0, 1, 1, 1], {0: 100, 1: 100}),  # later groups win
    ([MaskGroup(loop=1, length=2)], (6,), 5, [1] * 5, {}),  # a group for loop 1 does nothing in loop 0
])
def test_fill_conditioned_frames_against_hand_computed_masks(groups, lengths, frames, expected_mask, expected_values):
    z = paddle.full([1, 2, frames, 1, 1], -1.0)
    item = EncodedConditions(reference_latents(*lengths), list(lengths), groups)
    mask = fill_conditioned_frames(z, [item], loop=0, clip_length=frames, vae=FRAME_VAE)
    assert mask.shape == [1, frames] and mask.dtype == paddle.float32
    np.testing.assert_allclose(mask.numpy()[0], expected_mask, rtol=1e-6)
    values = z.numpy()[0, :, :, 0, 0]
    for frame in range(frames):
        assert values[0, frame] == values[1, frame] == expected_values.get(frame, -1.0)


@pytest.fixture(scope="module")
def video_vae():
    """v1.2's video VAE (tiny widths, the released 17-frame chunks and 4x time compression)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "vae_v1_2", "tiny.json")
    return VideoAutoencoderV1_2(VideoAutoencoderV1_2Config.from_json_file(path))


def test_video_vae_places_frames_in_latent_frames_chunk_by_chunk(video_vae):
    # A 17-frame chunk is padded in front to 20: latent 0 holds frame 0, latent k frames 4k-3..4k. A last chunk of
    # 3 frames is padded to 4, so its 3 frames share one latent frame.
    expected = {0: 0, 1: 1, 4: 1, 5: 2, 16: 4, 17: 5, 18: 6, 33: 9, 34: 10, 50: 14}
    assert {frame: video_vae.latent_frame_index(frame, 51) for frame in expected} == expected
    assert [video_vae.latent_frame_index(frame, 20) for frame in (16, 17, 18, 19)] == [4, 5, 5, 5]
    assert video_vae.latent_frame_index(0, 1) == 0 and video_vae.chunk_latent_frames == 5
    for frames in (1, 16, 17, 20, 51, 60):  # the last frame is in the last latent frame the VAE makes
        assert video_vae.latent_frame_index(frames - 1, frames) + 1 == video_vae.get_latent_size([frames, None, None])[0]


def test_latent_spans_with_a_video_vae_and_v12_align(video_vae):
    # connect on 51 frames: the last frame is latent 14; align 5 moves it to the last chunk's start, as v1.2 does
    last = MaskGroup(reference=1, target_start=-1)
    assert latent_span(last, 1, 51, video_vae) == (0, 14, 1)
    assert latent_span(last, 1, 51, video_vae, align=5) == (0, 10, 1)
    # extend: the last 17 frames of a 34-frame video (its second chunk, latents 5-9) start the clip
    assert latent_span(MaskGroup(source_start=-17, length=17), 34, 51, video_vae, align=5) == (5, 0, 5)
    # frames 25-32 are latents 7-9; align moves the start to 5, the nearer chunk start, keeping 3 latent frames
    assert latent_span(MaskGroup(source_start=25, length=8), 34, 51, video_vae) == (7, 0, 3)
    assert latent_span(MaskGroup(source_start=25, length=8), 34, 51, video_vae, align=5) == (5, 0, 3)
    # a start past the middle of a chunk goes to the next one, unless that leaves no whole chunk in the clip
    assert latent_span(MaskGroup(target_start=12), 1, 51, video_vae, align=5) == (0, 5, 1)
    assert latent_span(MaskGroup(target_start=44), 1, 51, video_vae, align=5) == (0, 10, 1)


def test_fill_conditioned_frames_in_latent_frames(video_vae):
    # 17 pixel frames in 5 latent frames: the last chunk of a 34-frame reference (latents 5-9) starts the clip,
    # an image ends it (align 5: at the last chunk's start)
    z = paddle.full([1, 2, 5, 1, 1], -1.0)
    item = EncodedConditions(reference_latents(10, 1), [34, 1],
                             [MaskGroup(source_start=-17, length=17), MaskGroup(reference=1, target_start=-1, edit_ratio=0.5)])
    mask = fill_conditioned_frames(z, [item], loop=0, clip_length=17, vae=video_vae, align=1)
    np.testing.assert_array_equal(mask.numpy(), [[0, 0, 0, 0, 0.5]])
    np.testing.assert_array_equal(z.numpy()[0, :, :, 0, 0], [[105, 106, 107, 108, 200]] * 2)


def test_groups_of_other_loops_are_skipped_not_stopping_at_them():
    z = paddle.zeros([2, 3, 4, 1, 1])  # batch 2, 3 channels: the mask is [batch, frames]
    items = [EncodedConditions([], [], []),
             EncodedConditions([paddle.full([3, 2, 1, 1], 7.0)], [2], [MaskGroup(loop=1), MaskGroup(0, 0, 1, 2, 1, 0.5)])]
    masks = fill_conditioned_frames(z, items, loop=0, clip_length=4, vae=FRAME_VAE)
    np.testing.assert_array_equal(masks.numpy(), [[1, 1, 1, 1], [1, 1, 0.5, 1]])
    assert masks.dtype == paddle.float32
    np.testing.assert_array_equal(z.numpy()[0, :, :, 0, 0], [[0, 0, 0, 0]] * 3)
    np.testing.assert_array_equal(z.numpy()[1, :, :, 0, 0], [[0, 0, 7, 0]] * 3)


# ------------------------------------------------------------------------------------- encoding and loops


class BlockAverageVAE:
    """Stands in for the VAE: averages 8x8 pixel blocks and repeats the channel mean into 4 latent channels."""

    def __init__(self):
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        B, C, T, H, W = x.shape
        blocks = x.reshape([B, C, T, H // 8, 8, W // 8, 8]).mean(axis=[1, 4, 6])
        return blocks[:, None].tile([1, 4, 1, 1, 1])


def test_encode_references_reads_and_encodes_each_reference_once(media):
    image, video = media
    fake = types.SimpleNamespace(vae=BlockAverageVAE())
    encoded = OpenSoraPipeline.encode_references(fake, [Conditions(), Conditions([image, video])], 16, 24)
    assert fake.vae.calls == 2
    assert (encoded[0].latents, encoded[0].lengths, encoded[0].mask_groups) == ([], [], [])
    assert [list(latents.shape) for latents in encoded[1].latents] == [[4, 1, 2, 3], [4, 6, 2, 3]]
    assert encoded[1].lengths == [1, 6] and encoded[1].mask_groups == [MaskGroup()]
    white = encoded[1].latents[0].numpy()
    np.testing.assert_allclose(white, np.ones_like(white), atol=0.02)
    expected = Reference(video).pixels(16, 24).reshape(3, 6, 2, 8, 3, 8).mean(axis=(0, 3, 5))
    np.testing.assert_allclose(encoded[1].latents[1].numpy()[2], expected, atol=1e-5)


def test_a_loop_reference_starts_the_next_clip_and_copies_are_independent():
    item = EncodedConditions(reference_latents(3), [3], [MaskGroup()])
    empty = EncodedConditions([], [], [])
    copies = [item.copy(), empty.copy()]
    previous = paddle.full([2, 2, 2, 1, 1], 9.0)  # the last 2 frames of the previous clip, encoded
    for i, copy in enumerate(copies):
        copy.add_loop_reference(previous[i], length=2, loop=1)
    assert copies[0].mask_groups == [MaskGroup(), MaskGroup(loop=1, reference=1, length=2)] and copies[0].lengths == [3, 2]
    assert copies[1].mask_groups == [MaskGroup(loop=1, reference=0, length=2)] and copies[1].lengths == [2]
    assert (len(item.latents), item.lengths, item.mask_groups) == (1, [3], [MaskGroup()])  # the originals are kept
    assert empty.mask_groups == []
    z = paddle.full([2, 2, 5, 1, 1], -1.0)
    mask = fill_conditioned_frames(z, copies, loop=1, clip_length=5, vae=FRAME_VAE)
    np.testing.assert_array_equal(mask.numpy(), [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(z.numpy()[:, 0, :, 0, 0], [[9, 9, -1, -1, -1]] * 2)
    mask = fill_conditioned_frames(paddle.zeros([2, 2, 5, 1, 1]), copies, loop=0, clip_length=5, vae=FRAME_VAE)
    np.testing.assert_array_equal(mask.numpy(), [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


class RecordingScheduler:
    """Fills frame t of every frame the mask leaves to generate with 10 * (call number) + t; records the
    prompts, the mask and the values of the conditioned frames (None for the generated ones) it was given."""

    num_inference_steps = 1

    def __init__(self):
        self.masks, self.prompts, self.conditioned = [], [], []

    def sample(self, model, text_encoder, z, prompts, additional_args, mask, progress, cfg_scale, step_callback):
        mask = mask.numpy()
        self.masks.append(mask.tolist())
        self.prompts.append(prompts)
        self.conditioned.append([[None if m == 1 else float(v) for m, v in zip(row, values)]
                                 for row, values in zip(mask, z.numpy()[:, 0, :, 0, 0])])
        generated = 10.0 * len(self.masks) + paddle.arange(z.shape[2], dtype="float32").reshape([1, 1, -1, 1, 1])
        return paddle.where(paddle.to_tensor(mask == 1)[:, None, :, None, None].expand(z.shape), generated.expand(z.shape), z)


class CopyVAE:
    """Latents are the pixels plus a copy of the first channel; decoding drops it."""

    out_channels, dtype, chunk_latent_frames = 4, "float32", 1
    latent_frame_index = staticmethod(FRAME_VAE.latent_frame_index)

    def get_latent_size(self, input_size):
        return list(input_size)

    def encode(self, x):
        return paddle.concat([x, x[:, :1]], axis=1)

    def decode(self, z, num_frames):
        assert num_frames == z.shape[2]
        return z[:, :3]


def test_loops_condition_each_clip_on_the_end_of_the_previous_one_and_drop_the_repeat():
    text_encoder = types.SimpleNamespace(eval=lambda: None, parameters=lambda: [], config=types.SimpleNamespace(d_model=4))
    fake = types.SimpleNamespace(
        vae=CopyVAE(), vae_scale_factor=1, size_arguments=lambda *args: {}, text_encoder=text_encoder, tokenizer=None,
        transformer=types.SimpleNamespace(config=types.SimpleNamespace(model_max_length=4), y_embedder=None),
    )
    scheduler = RecordingScheduler()
    encoded = [EncodedConditions([], [], []), EncodedConditions([paddle.full([4, 1, 1, 1], 7.0)], [1], [MaskGroup()])]
    videos = OpenSoraPipeline.generate_long_video(
        fake, [["a", "b", "c"], ["d", "e", "f"]], encoded, scheduler, num_frames=5, height=1, width=1, fps=8, loop=3,
        condition_frame_length=2, align=1, guidance_scale=4.0, output_type="np", step_callback=lambda i, t, z: z,
    )
    assert scheduler.prompts == [["a", "d"], ["b", "e"], ["c", "f"]]
    assert scheduler.masks == [[[1] * 5, [0, 1, 1, 1, 1]], [[0, 0, 1, 1, 1]] * 2, [[0, 0, 1, 1, 1]] * 2]
    # each later clip starts with the last 2 frames of the one before
    none = [None] * 3
    assert scheduler.conditioned == [[[None] * 5, [7] + [None] * 4], [[13, 14] + none] * 2, [[23, 24] + none] * 2]
    # 5 frames, then 3 new frames per loop: the 2 conditioning frames of a later clip are not repeated
    assert [video.shape for video in videos] == [(3, 11, 1, 1)] * 2
    assert videos[0][0, :, 0, 0].tolist() == [10, 11, 12, 13, 14, 22, 23, 24, 32, 33, 34]
    assert videos[1][0, :, 0, 0].tolist() == [7, 11, 12, 13, 14, 22, 23, 24, 32, 33, 34]


@pytest.fixture(scope="module")
def tiny_pipe(tiny_models):
    pipe = OpenSoraPipeline.from_component_paths(tiny_models["stdit2"], tiny_models["vae"], tiny_models["text_encoder"],
                                                 build_scheduler(read_model_defaults(tiny_models["stdit2"])))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("num_frames,condition_frame_length", [(3, 1), (7, 1), (16, 4)])
def test_the_default_loop_condition_is_a_quarter_of_the_clip(tiny_pipe, num_frames, condition_frame_length):
    frames = tiny_pipe("a red circle", num_frames=num_frames, height=16, width=16, fps=8, loop=2, seed=0).frames
    assert frames.shape[1] == 2 * num_frames - condition_frame_length
