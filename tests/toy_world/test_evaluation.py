import numpy as np
import pytest

from toy_world.synthetic import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, render_clip, sample_clip
from toy_world.evaluation import (
    colour_matches,
    direction_matches,
    dominant_colour,
    motion_direction,
    psnr,
    to_frames,
)


def square_clip(rgb, step=(2, 0), start=(16, 24), background=BACKGROUNDS["dark"], num_frames=16, size=8):
    """A hand-made clip: a `size`-px square of colour `rgb` whose corner moves by `step` pixels per frame
    (a list of steps gives one position per frame) over a plain background."""
    frames = np.empty((num_frames, 64, 64, 3), np.float32)
    frames[:] = background
    positions = step if isinstance(step, list) else [(start[0] + step[0] * t, start[1] + step[1] * t) for t in range(num_frames)]
    for t, (x, y) in enumerate(positions):
        frames[t, y : y + size, x : x + size] = rgb
    return frames


@pytest.mark.parametrize("colour", list(COLOURS))
def test_rendered_clips_pass_both_judges(colour):
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        for direction in DIRECTIONS:
            clip = sample_clip(rng, (colour, shape, direction), 64, 64)
            frames = render_clip(clip, 16, 64, 64).astype(np.float32)
            assert dominant_colour(frames) == colour
            assert motion_direction(frames) == direction
            assert colour_matches(frames, colour), clip
            assert direction_matches(frames, direction), clip
            others = [name for name in COLOURS if name != colour]
            assert not any(colour_matches(frames, other) for other in others)
            assert not any(direction_matches(frames, other) for other in DIRECTIONS if other != direction)


def test_a_clean_red_mover_going_right_is_red_and_right():
    frames = square_clip(COLOURS["red"], step=(2, 0))
    assert colour_matches(frames, "red") and direction_matches(frames, "right")


@pytest.mark.parametrize("orange", [(144, 92, 24), (139, 90, 36), (230, 120, 30)])
def test_an_orange_blob_is_neither_red_nor_yellow(orange):
    frames = square_clip(orange)
    assert dominant_colour(frames) == "red"  # what the lenient judge said
    assert not colour_matches(frames, "red") and not colour_matches(frames, "yellow")


def test_dull_or_grey_objects_have_no_colour():
    # The hue of red, but little saturation (a brownish pink) or little value (dark red).
    assert not colour_matches(square_clip((200, 140, 140)), "red")
    assert not colour_matches(square_clip((100, 15, 15), background=BACKGROUNDS["dark"]), "red")
    assert colour_matches(square_clip((240, 240, 240)), "white")
    assert not colour_matches(square_clip((150, 150, 150)), "white")  # grey, not white
    assert not colour_matches(square_clip((240, 200, 120)), "white")  # too saturated


def test_a_diagonal_mover_is_not_right():
    frames = square_clip(COLOURS["red"], step=(2, 2), start=(8, 8))
    assert motion_direction(frames) in ("right", "down")  # what the lenient judge said
    assert not direction_matches(frames, "right") and not direction_matches(frames, "down")


def test_a_slightly_tilted_path_still_counts():
    positions = [(8 + 2 * t, 20 + (t * 4) // 15) for t in range(16)]  # 30 px right, 4 px down
    assert direction_matches(square_clip(COLOURS["green"], step=positions), "right")


def test_too_short_or_jumping_paths_do_not_count():
    assert not direction_matches(square_clip(COLOURS["blue"], step=(0, 0)), "right")
    # 4 px of travel over the clip: less than "a few pixels".
    positions = [(20 + t // 4, 20) for t in range(16)]
    assert not direction_matches(square_clip(COLOURS["blue"], step=positions), "right")
    # Drifts right on average, but jumps up and down between two places.
    positions = [(10 + 2 * t, 8 if t % 2 else 40) for t in range(16)]
    assert not direction_matches(square_clip(COLOURS["blue"], step=positions), "right")


def test_static_or_empty_clips_have_no_direction():
    frames = np.full((8, 32, 32, 3), 10.0)
    assert dominant_colour(frames) is None and motion_direction(frames) is None
    assert not colour_matches(frames, "red") and not direction_matches(frames, "right")
    frames[:, 10:16, 10:16] = COLOURS["red"]
    assert dominant_colour(frames) == "red" and motion_direction(frames) is None


def test_psnr_and_video_conversion():
    video = np.zeros((3, 2, 4, 4), dtype=np.float32)
    frames = to_frames(video)
    assert frames.shape == (2, 4, 4, 3) and np.allclose(frames, 127.5)
    assert psnr(frames, frames) == float("inf")
    assert psnr(np.zeros(4), np.full(4, 255.0 / 10)) == pytest.approx(20.0)
