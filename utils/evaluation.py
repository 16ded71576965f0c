"""Measurements on decoded frames of the toy world of `dataset.synthetic`: which colour the moving object
has, which way it moves, and how close conditioned frames are to their references.

Frames are float arrays [T, H, W, 3] with values in [0, 255] (or [3, T, H, W] in [-1, 1], see
`to_frames`). The background of a frame is its median colour; object pixels differ from it clearly.
"""

import math

import numpy as np

from dataset.synthetic import COLOURS, DIRECTIONS

# A pixel belongs to the object when it is this far (RGB distance) from the background colour.
OBJECT_THRESHOLD = 60.0
# Fewer object pixels than this in a frame means the frame shows no object.
MIN_OBJECT_PIXELS = 4


def to_frames(video):
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] in [0, 255] float."""
    video = np.asarray(video, dtype=np.float32)
    return ((video.clip(-1, 1) + 1) * 127.5).transpose(1, 2, 3, 0)


def object_masks(frames):
    """Bool [T, H, W]: pixels far from each frame's median (background) colour."""
    background = np.median(frames.reshape(len(frames), -1, 3), axis=1)
    distance = np.linalg.norm(frames - background[:, None, None, :], axis=-1)
    return distance > OBJECT_THRESHOLD


def dominant_colour(frames):
    """Name of the table colour nearest to the mean object pixel over the clip (None without an object)."""
    masks = object_masks(frames)
    if masks.sum() < MIN_OBJECT_PIXELS:
        return None
    mean_rgb = frames[masks].mean(axis=0)
    return min(COLOURS, key=lambda name: np.linalg.norm(mean_rgb - np.asarray(COLOURS[name], dtype=np.float32)))


def centroids(frames):
    """Object centroid (x, y) per frame, NaN where a frame shows no object."""
    masks = object_masks(frames)
    result = np.full((len(frames), 2), np.nan)
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    for t, mask in enumerate(masks):
        if mask.sum() >= MIN_OBJECT_PIXELS:
            result[t] = xs[mask].mean(), ys[mask].mean()
    return result


def motion_direction(frames, min_travel=2.0):
    """'left'/'right'/'up'/'down' from a least-squares fit of the centroid path, or None when the object
    moves less than `min_travel` pixels over the clip or is missing in most frames."""
    points = centroids(frames)
    valid = ~np.isnan(points[:, 0])
    if valid.sum() < max(2, len(frames) // 2):
        return None
    t = np.arange(len(frames))[valid]
    velocity = np.array([np.polyfit(t, points[valid, axis], 1)[0] for axis in (0, 1)])
    if np.abs(velocity).max() * (len(frames) - 1) < min_travel:
        return None
    unit = velocity / np.linalg.norm(velocity)
    return max(DIRECTIONS, key=lambda name: float(np.dot(unit, DIRECTIONS[name])))


def psnr(a, b, peak=255.0):
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def mean_abs_change(a, b):
    """Mean absolute pixel difference in [0, 255] units."""
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
