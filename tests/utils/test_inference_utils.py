import io
import os

import av
import numpy as np
import paddle
import pytest
from PIL import Image

from dataset.synthetic import encode_mp4
from utils.errors import UserError
from utils.inference_utils import (
    MaskGroup,
    add_loop_condition,
    apply_mask_strategy,
    collect_references,
    concat_loop_clips,
    default_condition_frame_length,
    extract_json_from_prompts,
    parse_mask_strategy,
    probe_reference,
    process_prompts,
    read_from_path,
    save_sample,
    validate_mask_strategy,
)


# ------------------------------------------------------------------------------------ prompt parsing


def test_extract_json_from_prompts():
    texts, infos = extract_json_from_prompts(['A sunrise.{"reference_path": "a.png;b.png","mask_strategy": "0;0,1,0,-1,1"}', "plain"])
    assert texts == ["A sunrise.", "plain"]
    assert infos == [{"reference_path": "a.png;b.png", "mask_strategy": "0;0,1,0,-1,1"}, {}]


@pytest.mark.parametrize("prompt,message", [
    ('x{"reference_path": "a.png"', "malformed"),
    ('x{"reference_path": "a.png", "strength": 1}', r"unknown keys \['strength'\]"),
    ('x{"mask_strategy": 0}', "must be a string"),
    ("x{[1, 2]}", "malformed"),
])
def test_extract_json_errors_name_the_prompt(prompt, message):
    with pytest.raises(UserError, match=message) as error:
        extract_json_from_prompts([prompt])
    assert "prompt 'x" in str(error.value)


def test_loop_prompts():
    assert process_prompts(["|0|a dog|2|a cat"], 4) == [["a dog", "a dog", "a cat", "a cat"]]
    assert process_prompts(["a bird"], 2) == [["a bird", "a bird"]]
    for bad in ("|1|a dog", "|0|a|0|b", "|0|a|x|b", "|0|a|5|b", "|0|a|2"):
        with pytest.raises(UserError):
            process_prompts([bad], 4)


# ------------------------------------------------------------------------------------ mask strategies


@pytest.mark.parametrize("strategy,expected", [
    ("0", [MaskGroup(0, 0, 0, 0, 1, 0.0)]),
    ("0;0,1,0,-1,1", [MaskGroup(0, 0, 0, 0, 1, 0.0), MaskGroup(0, 1, 0, -1, 1, 0.0)]),
    ("0,0,0,-6,6", [MaskGroup(0, 0, 0, -6, 6, 0.0)]),
    ("0,0,0,0,7,0.4", [MaskGroup(0, 0, 0, 0, 7, 0.4)]),
    ("0,0,0,0,8,0.3", [MaskGroup(0, 0, 0, 0, 8, 0.3)]),
    ("0,0,0,0,1;0,0,0,-1,1", [MaskGroup(0, 0, 0, 0, 1, 0.0), MaskGroup(0, 0, 0, -1, 1, 0.0)]),
    ("2,1,-4,0,4", [MaskGroup(2, 1, -4, 0, 4, 0.0)]),
])
def test_parse_documented_strategies(strategy, expected):
    assert parse_mask_strategy(strategy, num_references=2) == expected


@pytest.mark.parametrize("strategy,message", [
    ("0,0,0,0,1,0,9", "1 to 6"),
    ("0,a", "must be numbers"),
    ("0,0,0,0,0", "m_length must be at least 1"),
    ("0,0,0,0,1,1.5", r"edit_ratio 1.5 must lie in \[0, 1\]"),
    ("0;0,2", r'group 2 "0,2": m_id 2 has no reference \(2 given'),
    ("", "1 to 6"),
])
def test_bad_strategies_name_group_and_rule(strategy, message):
    with pytest.raises(UserError, match=message):
        parse_mask_strategy(strategy, num_references=2)


def test_default_condition_frame_length():
    assert [default_condition_frame_length(n) for n in (1, 3, 16, 51)] == [1, 1, 4, 12]


def test_strategy_must_fit_references_and_clip():
    validate_mask_strategy(parse_mask_strategy("0,0,0,-6,6"), reference_lengths=[16], num_frames=12)
    with pytest.raises(UserError, match="outside reference 0, which has 4"):
        validate_mask_strategy(parse_mask_strategy("0,0,0,-6,6"), reference_lengths=[4], num_frames=12)
    with pytest.raises(UserError, match="do not fit in --num-frames 5"):
        validate_mask_strategy(parse_mask_strategy("0,0,0,0,7,0.4"), reference_lengths=[16], num_frames=5)


def references(*lengths):
    """Reference latents whose values are 100 * (reference id + 1) + frame index."""
    return [paddle.to_tensor(np.stack([np.full((2, 1, 1), 100 * (r + 1) + t, dtype="float32") for t in range(n)], axis=1)) for r, n in enumerate(lengths)]


@pytest.mark.parametrize("strategy,lengths,frames,expected_mask,expected_values", [
    ("0", (1,), 5, [0, 1, 1, 1, 1], {0: 100}),  # image condition
    ("0;0,1,0,-1,1", (1, 1), 5, [0, 1, 1, 1, 0], {0: 100, 4: 200}),  # connect
    ("0,0,0,-3,3", (6,), 5, [1, 1, 0, 0, 0], {2: 100, 3: 101, 4: 102}),  # extend: first 3 frames into the end
    ("0,0,-3,0,3", (6,), 5, [0, 0, 0, 1, 1], {0: 103, 1: 104, 2: 105}),  # extend: last 3 frames first
    ("0,0,0,0,5,0.4", (6,), 5, [0.4] * 5, {i: 100 + i for i in range(5)}),  # edit
    ("1,0,0,0,2", (6,), 5, [1] * 5, {}),  # a group for loop 1 does nothing in loop 0
])
def test_apply_mask_strategy_against_hand_computed_masks(strategy, lengths, frames, expected_mask, expected_values):
    z = paddle.full([1, 2, frames, 1, 1], -1.0)
    mask = apply_mask_strategy(z, [references(*lengths)], [strategy], loop_i=0)
    np.testing.assert_allclose(mask.numpy()[0], expected_mask, rtol=1e-6)
    values = z.numpy()[0, 0, :, 0, 0]
    for frame in range(frames):
        assert values[frame] == expected_values.get(frame, -1.0)


def test_loops_condition_on_the_previous_clip_and_concatenate():
    refs, strategies = add_loop_condition([[], references(3)], [None, "0"], paddle.zeros([2, 2, 5, 1, 1]), 1, 2)
    assert strategies == ["1,0,-2,0,2", "0;1,1,-2,0,2"]
    assert len(refs[0]) == 1 and len(refs[1]) == 2
    z = paddle.full([2, 2, 5, 1, 1], -1.0)
    mask = apply_mask_strategy(z, refs, strategies, loop_i=1)
    np.testing.assert_array_equal(mask.numpy(), [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    clips = [paddle.full([1, 3, 5, 1, 1], float(k)) for k in range(3)]
    video = concat_loop_clips(clips, 2)[0]
    assert video.shape == [3, 11, 1, 1] and video.numpy()[0, :, 0, 0].tolist() == [0] * 5 + [1] * 3 + [2] * 3


# ------------------------------------------------------------------------------------ media


@pytest.fixture
def media(tmp_path):
    image = tmp_path / "ref.png"
    Image.fromarray(np.full((30, 60, 3), 255, dtype=np.uint8)).save(image)
    frames = np.stack([np.full((40, 40, 3), 20 * t, dtype=np.uint8) for t in range(6)])
    video = tmp_path / "ref.mp4"
    video.write_bytes(encode_mp4(frames, 8))
    return image, video


def test_read_and_probe_references(media):
    image, video = media
    assert probe_reference(str(image)) == 1 and probe_reference(str(video)) == 6
    x = read_from_path(str(image), (16, 16))
    assert x.shape == (3, 1, 16, 16) and np.allclose(x, 1.0, atol=0.02)
    v = read_from_path(str(video), (16, 24))
    assert v.shape == (3, 6, 16, 24) and -1.0 <= v.min() and v.max() <= 1.0
    assert np.all(np.diff(v.mean(axis=(0, 2, 3))) > 0)  # frames in order


def jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


class BlockAverageVAE:
    """Stands in for the VAE: averages 8x8 pixel blocks and repeats the channel mean into 4 latent channels."""

    def __init__(self):
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        B, C, T, H, W = x.shape
        blocks = x.reshape([B, C, T, H // 8, 8, W // 8, 8]).mean(axis=[1, 4, 6])
        return blocks[:, None].tile([1, 4, 1, 1, 1])


def test_collect_references_encodes_each_path_once(media):
    image, video = media
    vae = BlockAverageVAE()
    refs = collect_references([None, f"{image};{video}"], vae, (16, 24))
    assert vae.calls == 2 and refs[0] == []
    assert [list(r.shape) for r in refs[1]] == [[4, 1, 2, 3], [4, 6, 2, 3]]
    white = refs[1][0].numpy()
    # Compared with an array, not the scalar 1.0: once ppdiffusers is imported (by another test) it sets
    # `np.bool = bool`, which breaks numpy's scalar comparison path in assert_allclose.
    np.testing.assert_allclose(white, np.ones_like(white), atol=0.02)
    expected = read_from_path(str(video), (16, 24)).reshape(3, 6, 2, 8, 3, 8).mean(axis=(0, 3, 5))
    np.testing.assert_allclose(refs[1][1].numpy()[2], expected, atol=1e-5)


def write(path, content):
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("make,message", [
    (lambda d: str(d / "missing.png"), "file not found"),
    (lambda d: str(d), "is a directory"),
    (lambda d: write(d / "empty.mp4", b""), "empty"),
    (lambda d: write(d / "text.png", b"not an image"), "not a readable image"),
    (lambda d: write(d / "cut.jpg", jpeg_bytes()[:300]), "not a readable image"),
    (lambda d: write(d / "cut.mp4", encode_mp4(np.zeros((4, 16, 16, 3), np.uint8), 8)[:100]), "not a readable image or video|no decodable"),
])
def test_bad_references(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        probe_reference(make(tmp_path))


def test_save_sample_round_trip_determinism_and_no_clobber(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (3, 5, 24, 30)).astype("float32")
    first = save_sample(video, fps=8, save_path=str(tmp_path / "s"))
    second = save_sample(video, fps=8, save_path=str(tmp_path / "s"))
    assert first.endswith("s.mp4") and second.endswith("s_1.mp4")
    assert open(first, "rb").read() == open(second, "rb").read()
    with av.open(first) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert (len(frames), frames[0].height, frames[0].width, float(stream.average_rate)) == (5, 24, 30, 8.0)
    again = save_sample(video, fps=8, save_path=str(tmp_path / "s"), overwrite=True)
    assert again == first and not os.path.exists(str(tmp_path / "s_2.mp4"))
    png = save_sample(video[:, :1], fps=8, save_path=str(tmp_path / "one"))
    assert png.endswith(".png") and Image.open(png).size == (30, 24)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
