"""Measurements on decoded frames of the toy world of `toy_world.synthetic`: which colour the moving object
has, which way it moves, and how close conditioned frames are to their references.

Frames are float arrays [T, H, W, 3] with values in [0, 255] (or [3, T, H, W] in [-1, 1], see
`to_frames`). The background of a frame is its median colour; object pixels differ from it clearly.

Two judges. The strict one (`colour_matches`, `direction_matches`) is what a person would agree with: the
object's hue is near the prompted hue with real saturation, and it travels along the prompted axis by more
than a few pixels, in a straight line, with little sideways drift. The lenient one (`dominant_colour`,
`motion_direction`) names the nearest palette colour and the nearest of four unit vectors, so an orange
blob counts as red and a diagonal mover as "right"; it is kept to compare with earlier results.
"""

import colorsys
import math

import numpy as np

from toy_world.synthetic import COLOURS, DIRECTIONS

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


# Strict colour: hue distance (on the [0, 1) hue circle) to the prompted colour, and the least saturation
# and value of a coloured object. Orange (hue ~0.09) is then neither red (0.0) nor yellow (0.15).
HUE_TOLERANCE = 0.05
MIN_SATURATION = 0.4
MIN_VALUE = 0.5
# Strict white: nearly grey and bright.
WHITE_MAX_SATURATION = 0.2
WHITE_MIN_VALUE = 0.75
# Strict direction: the fitted path must travel this far along the prompted axis over the clip (the toy
# objects travel 30 px at 64x64), sideways at most this share of it, and stay this close to a straight line.
MIN_STRICT_TRAVEL = 6.0
MAX_SIDEWAYS_SHARE = 0.5
MAX_PATH_RESIDUAL = 3.0


def object_colour(frames):
    """Median RGB of the object pixels over the clip (robust to antialiased edges), None without an object."""
    masks = object_masks(frames)
    if masks.sum() < MIN_OBJECT_PIXELS:
        return None
    return np.median(frames[masks], axis=0)


def hsv(rgb):
    """(hue, saturation, value), each in [0, 1], of an RGB colour in [0, 255]."""
    return colorsys.rgb_to_hsv(*(float(v) / 255.0 for v in rgb))


def colour_matches(frames, colour):
    """Strict judge: does the object look `colour` (a `toy_world.synthetic.COLOURS` name)?"""
    rgb = object_colour(frames)
    if rgb is None:
        return False
    hue, saturation, value = hsv(rgb)
    if colour == "white":
        return bool(saturation <= WHITE_MAX_SATURATION and value >= WHITE_MIN_VALUE)
    target_hue = hsv(COLOURS[colour])[0]
    hue_distance = min(abs(hue - target_hue), 1.0 - abs(hue - target_hue))
    return bool(hue_distance <= HUE_TOLERANCE and saturation >= MIN_SATURATION and value >= MIN_VALUE)


def object_path(frames):
    """(dx, dy, residual): displacement of the least-squares line through the object centroids over the
    whole clip in pixels, and the RMS distance of the centroids from that line; None when the object is
    missing in most frames."""
    points = centroids(frames)
    valid = ~np.isnan(points[:, 0])
    if valid.sum() < max(2, len(frames) // 2):
        return None
    t = np.arange(len(frames))[valid]
    fits = [np.polyfit(t, points[valid, axis], 1) for axis in (0, 1)]
    fitted = np.stack([np.polyval(fit, t) for fit in fits], axis=1)
    residual = float(np.sqrt(np.mean(np.sum((points[valid] - fitted) ** 2, axis=1))))
    return float(fits[0][0] * (len(frames) - 1)), float(fits[1][0] * (len(frames) - 1)), residual


def direction_matches(frames, direction):
    """Strict judge: does the object travel `direction` (a `toy_world.synthetic.DIRECTIONS` name)?"""
    path = object_path(frames)
    if path is None:
        return False
    dx, dy, residual = path
    unit_x, unit_y = DIRECTIONS[direction]
    along = dx * unit_x + dy * unit_y
    sideways = abs(dx * unit_y - dy * unit_x)
    return bool(along >= MIN_STRICT_TRAVEL and sideways <= MAX_SIDEWAYS_SHARE * along and residual <= MAX_PATH_RESIDUAL)


def describe(frames):
    """What the judges measured on a clip, for the per-prompt record."""
    rgb = object_colour(frames)
    path = object_path(frames)
    return {
        "rgb": None if rgb is None else [round(float(v), 1) for v in rgb],
        "hsv": None if rgb is None else [round(v, 3) for v in hsv(rgb)],
        "path_dx_dy_residual": None if path is None else [round(float(v), 2) for v in path],
        "lenient_colour": dominant_colour(frames),
        "lenient_direction": motion_direction(frames),
    }
