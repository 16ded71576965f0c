import numpy as np
import pytest

from dataset.synthetic import COLOURS, DIRECTIONS, SHAPES, render_clip, sample_clip
from utils.evaluation import dominant_colour, motion_direction, psnr, to_frames


@pytest.mark.parametrize("colour", list(COLOURS))
def test_rendered_clips_are_measured_correctly(colour):
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for direction in DIRECTIONS:
            clip = sample_clip(rng, (colour, shape, direction), 64, 64)
            frames = render_clip(clip, 16, 64, 64).astype(np.float32)
            assert dominant_colour(frames) == colour
            assert motion_direction(frames) == direction


def test_static_or_empty_clips_have_no_direction():
    frames = np.full((8, 32, 32, 3), 10.0)
    assert dominant_colour(frames) is None and motion_direction(frames) is None
    frames[:, 10:16, 10:16] = COLOURS["red"]
    assert dominant_colour(frames) == "red" and motion_direction(frames) is None


def test_psnr_and_video_conversion():
    video = np.zeros((3, 2, 4, 4), dtype=np.float32)
    frames = to_frames(video)
    assert frames.shape == (2, 4, 4, 3) and np.allclose(frames, 127.5)
    assert psnr(frames, frames) == float("inf")
    assert psnr(np.zeros(4), np.full(4, 255.0 / 10)) == pytest.approx(20.0)
