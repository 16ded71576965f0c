"""Render the small example assets used by the documented commands (condition images, a video, prompts).

    python scripts/make_assets.py            # writes into assets/

Everything is drawn with numpy/PIL from fixed formulas, so rerunning reproduces the files.
"""

import os
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse

import numpy as np
from PIL import Image, ImageDraw

from utils.errors import run_cli
from utils.io import atomic_path, write_text_atomic
from utils.media import encode_mp4

IMAGE_SIZE = (224, 300)  # height, width
VIDEO_SIZE = (256, 256)
VIDEO_FRAMES = 16
VIDEO_FPS = 8

PROMPTS = [
    "a red circle moving right on a dark background",
    "a yellow triangle moving up on a navy background",
    "a white circle moving left on a gray background",
    "a green triangle moving down on a dark background",
    # Held-out combinations: never seen together in training.
    "a red circle moving up on a gray background",
    "a blue square moving down on a navy background",
    "a sunset over the sea with gentle waves",
    "a big wave breaking under a clear sky",
]


def vertical_gradient(height, width, top_rgb, bottom_rgb):
    """[H, W, 3] float image blending from top_rgb (first row) to bottom_rgb (last row)."""
    weight = np.linspace(0.0, 1.0, height)[:, None, None]
    gradient = (1 - weight) * np.array(top_rgb, float) + weight * np.array(bottom_rgb, float)
    return np.broadcast_to(gradient, (height, width, 3)).copy()


def to_image(pixels):
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def render_sunset_over_sea(height, width):
    """Warm sky, a sun half-set on the horizon and its glitter path on a darker sea."""
    horizon = int(height * 0.58)
    image = vertical_gradient(height, width, (70, 40, 110), (250, 150, 60))
    sea = vertical_gradient(height - horizon, width, (120, 60, 70), (20, 25, 60))
    rows, cols = np.mgrid[0:height, 0:width]
    sun_x, sun_radius = width * 0.5, height * 0.16
    sun = (cols - sun_x) ** 2 + (rows - horizon) ** 2 < sun_radius**2
    image[sun] = (255, 220, 120)
    sea_rows, sea_cols = rows[horizon:], cols[horizon:]
    depth = (sea_rows - horizon) / (height - horizon)
    # Short horizontal glints, denser near the sun's column, widening towards the viewer.
    glint = np.sin(sea_cols * 0.9 + sea_rows * 2.3) * np.sin(sea_rows * 1.7) > 0.6
    near_path = np.abs(sea_cols - sun_x) < sun_radius * (0.6 + 1.5 * depth)
    sea[glint & near_path] = (255, 200, 110)
    image[horizon:] = sea
    return to_image(image)


def render_sunset_over_hills(height, width):
    """Sunset with a large low sun behind two layers of dark hills."""
    image = vertical_gradient(height, width, (40, 30, 90), (255, 120, 70))
    rows, cols = np.mgrid[0:height, 0:width]
    sun = (cols - width * 0.65) ** 2 + (rows - height * 0.55) ** 2 < (height * 0.2) ** 2
    image[sun] = (255, 200, 90)
    x = np.arange(width)
    far_ridge = height * 0.62 + height * 0.06 * np.sin(x / width * 2 * np.pi * 1.5 + 0.8)
    near_ridge = height * 0.75 + height * 0.08 * np.sin(x / width * 2 * np.pi * 0.8 + 2.0)
    image[rows > far_ridge[None, :]] = (90, 40, 70)
    image[rows > near_ridge[None, :]] = (35, 15, 40)
    return to_image(image)


def render_wave(height, width):
    """A stylised breaking wave: a steep blue crest curling left with a white foam lip, over a pale sky."""
    image = vertical_gradient(height, width, (150, 200, 240), (225, 240, 250))
    rows, cols = np.mgrid[0:height, 0:width]
    x = cols / width
    crest = height * (0.75 - 0.45 * np.exp(-(((x - 0.6) / 0.22) ** 2)) - 0.03 * np.sin(x * 25))
    water = rows > crest
    shade = np.clip((rows - crest) / (height * 0.6), 0, 1)[..., None]
    image[water] = ((1 - shade) * np.array([40, 130, 190]) + shade * np.array([10, 40, 90]))[water]
    foam = water & (rows < crest + height * 0.04)
    image[foam] = (240, 250, 255)
    # The curling lip: a foam arc hanging in front of the crest.
    picture = to_image(image)
    top = height * 0.28
    ImageDraw.Draw(picture).arc([width * 0.3, top, width * 0.6, top + height * 0.3], start=180, end=330, fill=(240, 250, 255), width=6)
    return picture


def render_car_over_water(num_frames, height, width):
    """Frames [T, H, W, 3] uint8: a red car-like box driving right across rippling water."""
    rows, cols = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(num_frames):
        ripple = np.sin(cols * 0.08 + rows * 0.05 + t * 0.6) + np.sin(rows * 0.13 - t * 0.4)
        water = np.stack([30 + 10 * ripple, 90 + 20 * ripple, 150 + 25 * ripple], axis=-1)
        picture = to_image(water)
        draw = ImageDraw.Draw(picture)
        left = 20 + t * (width - 120) / (num_frames - 1)
        base = height * 0.62
        draw.rectangle([left, base - 30, left + 90, base], fill=(200, 30, 30))  # body
        draw.rectangle([left + 20, base - 52, left + 65, base - 30], fill=(170, 20, 20))  # cabin
        draw.rectangle([left + 27, base - 47, left + 58, base - 33], fill=(180, 220, 240))  # window
        for wheel_x in (left + 18, left + 72):
            draw.ellipse([wheel_x - 10, base - 10, wheel_x + 10, base + 10], fill=(20, 20, 20))
        frames.append(np.asarray(picture))
    return np.stack(frames)


def save_png(image, path):
    with atomic_path(path) as tmp_path:
        image.save(tmp_path, format="PNG")


def make_assets(assets_dir):
    height, width = IMAGE_SIZE
    condition_dir = os.path.join(assets_dir, "images", "condition")
    save_png(render_wave(height, width), os.path.join(condition_dir, "wave.png"))
    save_png(render_sunset_over_sea(height, width), os.path.join(condition_dir, "sunset1.png"))
    save_png(render_sunset_over_hills(height, width), os.path.join(condition_dir, "sunset2.png"))
    frames = render_car_over_water(VIDEO_FRAMES, *VIDEO_SIZE)
    with atomic_path(os.path.join(assets_dir, "videos", "d0_proc.mp4")) as tmp_path:
        with open(tmp_path, "wb") as f:
            f.write(encode_mp4(frames, VIDEO_FPS, crf=12))
    write_text_atomic(os.path.join(assets_dir, "texts", "t2v_samples.txt"), "\n".join(PROMPTS) + "\n")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets-dir", default="assets")
    args = parser.parse_args(argv)
    make_assets(args.assets_dir)
    print(f"wrote example assets into {args.assets_dir}")


if __name__ == "__main__":
    run_cli(main)
