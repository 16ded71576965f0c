import csv
import filecmp
import os

import av
import numpy as np
import pytest

from toy_world import synthetic
from utils.errors import UserError


def read_rows(csv_path):
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def decode(path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        codec, pix_fmt = stream.codec_context.name, stream.codec_context.pix_fmt
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    return frames, codec, pix_fmt


def object_mask(frame, background_rgb):
    """Pixels that clearly differ from the plain background colour."""
    return np.abs(frame.astype(int) - np.array(background_rgb)).sum(axis=-1) > 120


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """60 training clips (every seen combination at least once) of 8 frames at 64x64, 1 clip per held-out combo."""
    output_dir = tmp_path_factory.mktemp("synthetic")
    synthetic.write_dataset(output_dir, num_clips=60, num_heldout_clips_per_combination=1, seed=5, num_frames=8)
    return output_dir


def test_same_seed_gives_identical_csv_and_frames(tmp_path):
    settings = dict(num_clips=3, num_heldout_clips_per_combination=1, seed=11, num_frames=4, size=(32, 48))
    synthetic.write_dataset(tmp_path / "a", **settings)
    synthetic.write_dataset(tmp_path / "b", **settings)
    for name in ("train.csv", "heldout.csv", "combinations.json"):
        assert filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False)
    for row in read_rows(tmp_path / "a" / "train.csv"):
        frames_a, _, _ = decode(str(tmp_path / "a" / row["path"]))
        frames_b, _, _ = decode(str(tmp_path / "b" / row["path"]))
        np.testing.assert_array_equal(frames_a, frames_b)

    synthetic.write_dataset(tmp_path / "c", **dict(settings, seed=12))
    first_clip = "videos/train/000000.mp4"
    assert not np.array_equal(decode(str(tmp_path / "a" / first_clip))[0], decode(str(tmp_path / "c" / first_clip))[0])


def test_csv_columns_and_video_files(small_dataset):
    rows = read_rows(small_dataset / "train.csv")
    assert list(rows[0]) == ["path", "text", "num_frames", "height", "width", "fps", "aspect_ratio"]
    assert len(rows) == 60
    for row in rows[:5]:
        frames, codec, pix_fmt = decode(str(small_dataset / row["path"]))
        assert frames.shape == (8, 64, 64, 3)
        assert (int(row["num_frames"]), int(row["height"]), int(row["width"])) == (8, 64, 64)
        assert (codec, pix_fmt) == ("h264", "yuv420p")
        assert float(row["aspect_ratio"]) == 1.0 and int(row["fps"]) == synthetic.DEFAULT_FPS


def test_held_out_combinations_only_in_heldout_csv(small_dataset):
    def combos(csv_name):
        parsed = [synthetic.parse_caption(row["text"]) for row in read_rows(small_dataset / csv_name)]
        return {(p["colour"], p["shape"], p["direction"]) for p in parsed}

    held_out = set(synthetic.HELD_OUT_COMBINATIONS)
    assert len(held_out) == 8
    assert combos("train.csv") == set(synthetic.all_combinations()) - held_out
    assert combos("heldout.csv") == held_out


def test_frames_show_the_captioned_colour_shape_and_motion(small_dataset):
    # Filled fraction of the object's bounding box: 1 for a square, pi/4 for a circle, 1/2 for a triangle.
    fill_ranges = {"square": (0.9, 1.01), "circle": (0.7, 0.86), "triangle": (0.4, 0.62)}
    motion_checked = left_the_frame = 0
    rows = read_rows(small_dataset / "train.csv") + read_rows(small_dataset / "heldout.csv")
    for row in rows:
        caption = synthetic.parse_caption(row["text"])
        frames, _, _ = decode(str(small_dataset / row["path"]))
        # A short caption does not name the background: it is then the colour of the frame's corner.
        background = synthetic.BACKGROUNDS[caption["background"]] if caption["background"] else frames[0, 0, 0]
        masks = [object_mask(frame, background) for frame in frames]
        # The object starts fully in view: colour and shape are checked on the first frame.
        ys, xs = np.nonzero(masks[0])
        assert 0 < xs.min() and xs.max() < 63 and 0 < ys.min() and ys.max() < 63, row["text"]
        # The inner pixels carry the object's colour (edges are blended with the background).
        colour_error = np.abs(np.median(frames[0][masks[0]].astype(int), axis=0) - np.array(synthetic.COLOURS[caption["colour"]]))
        assert colour_error.max() < 30, (row["text"], colour_error)
        box_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        low, high = fill_ranges[caption["shape"]]
        assert low < masks[0].sum() / box_area < high, (row["text"], masks[0].sum() / box_area)

        # Motion between the first and the last frame that still show the whole object (nothing on the border).
        inside = [t for t, mask in enumerate(masks) if mask.any() and not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())]
        left_the_frame += inside[-1] < len(frames) - 1
        if inside[-1] < 3:
            continue
        motion_checked += 1
        centroids = [np.array([np.nonzero(masks[t])[1].mean(), np.nonzero(masks[t])[0].mean()]) for t in (0, inside[-1])]
        displacement = centroids[1] - centroids[0]
        expected = np.array(synthetic.DIRECTIONS[caption["direction"]])
        assert displacement @ expected > 1.5 * inside[-1], (row["text"], displacement)  # ~2 px per frame
        assert abs(displacement @ expected[::-1]) < 1.5, (row["text"], displacement)  # no sideways drift
    assert motion_checked > len(rows) // 2
    # Start positions do not depend on the direction, so some objects reach the border before the clip ends.
    assert left_the_frame > 0


def test_parse_caption_round_trip_and_rejects_other_text():
    text = synthetic.caption("yellow", "triangle", "up", "navy")
    assert text == "a yellow triangle moving up on a navy background"
    assert synthetic.parse_caption(text) == {
        "colour": "yellow",
        "shape": "triangle",
        "direction": "up",
        "background": "navy",
    }
    assert synthetic.parse_caption("on a gray background, a red square heading left") == {
        "colour": "red", "shape": "square", "direction": "left", "background": "gray"
    }
    assert synthetic.parse_caption("green circle going down") == {
        "colour": "green", "shape": "circle", "direction": "down", "background": None
    }
    for text in (
        "a purple circle moving up on a navy background",
        "a sunset over the sea",
        "a red blue circle moving up",
        "a red circle moving up down",
        "a red circle crawling up",
        "moving up a red circle",
    ):
        with pytest.raises(UserError):
            synthetic.parse_caption(text)


def test_captions_are_written_the_ways_people_write_them(small_dataset):
    rows = read_rows(small_dataset / "train.csv")
    texts = [row["text"] for row in rows]
    # Every clip's caption names its own attributes, whatever the wording.
    for row in rows:
        parsed = synthetic.parse_caption(row["text"])
        assert parsed["colour"] in row["text"] and parsed["direction"] in row["text"]
    short = [t for t in texts if "background" not in t]
    assert 0.2 < len(short) / len(texts) < 0.6  # two of the five templates are short
    assert any(t.startswith("on a ") for t in texts) and any(t.split()[0] in synthetic.COLOURS for t in texts)
    for verb in ("moving", "going", "heading"):
        assert any(f" {verb} " in t for t in texts), verb
    # The wording has its own random stream: the clips are those an all-canonical data set would render.
    clip = synthetic.sample_clip(np.random.default_rng([5, 0, 7]), synthetic.seen_combinations()[7], 64, 64)
    frames, _, _ = decode(str(small_dataset / rows[7]["path"]))
    rendered = synthetic.render_clip(clip, 8, 64, 64)
    assert np.abs(frames.astype(int) - rendered).mean() < 2.0


def test_vocabulary_covers_every_caption_word():
    vocabulary = set(synthetic.caption_vocabulary())
    assert {"going", "heading", "moving", "background"} <= vocabulary
    for text in synthetic.all_captions():
        assert set(text.replace(",", " ").split()) <= vocabulary
    assert len(synthetic.all_captions()) == 60 * len(synthetic.BACKGROUNDS) * 5 * 3


@pytest.mark.parametrize(
    "settings",
    [dict(size=(0, 64)), dict(size=(64, -2)), dict(size=(63, 64)), dict(num_frames=1), dict(num_clips=0)],
)
def test_bad_settings_raise_user_error(tmp_path, settings):
    with pytest.raises(UserError):
        synthetic.write_dataset(tmp_path, **settings)
    assert not os.listdir(tmp_path)


def test_start_position_does_not_depend_on_the_direction():
    # With the direction free of the first frame, only the caption can tell a model where the object goes.
    starts = {direction: synthetic.sample_clip(np.random.default_rng(3), ("red", "circle", direction), 64, 64)["start"] for direction in synthetic.DIRECTIONS}
    assert len(set(starts.values())) == 1
