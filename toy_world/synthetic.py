"""A captioned toy video data set: one coloured shape moving in a straight line over a plain background.

Every clip shows a circle, square or triangle in one of five colours moving left, right, up or down (it
starts in view anywhere and may leave the frame). Captions are written the ways people write them: "a red
circle moving left on a dark background", "red circle heading left", "on a navy background, a red circle
going left" (`CAPTION_TEMPLATES` x `MOTION_VERBS`). A fixed set of colour x shape x direction combinations (`HELD_OUT_COMBINATIONS`) never appears
in the training split, so a model trained on it can be asked for those prompts to test whether it composes
attributes it has only seen separately.

Layout written by `write_dataset(output_dir, ...)`:
    train.csv, heldout.csv      meta CSVs (path,text,num_frames,height,width,fps,aspect_ratio), paths
                                relative to output_dir
    combinations.json           the seen and held-out combinations and the rendering settings
    videos/train/000000.mp4     H.264, yuv420p, one file per clip
    videos/heldout/000000.mp4

Clip i of a split is rendered from its own random stream seeded by (seed, split, i), so the same seed gives
byte-identical CSVs and identical decoded frames whatever the number of clips.
"""

import csv
import io
import itertools
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from utils.errors import UserError
from utils.io import atomic_path, write_text_atomic
from utils.media import encode_mp4

# Hues far apart from each other and from every background, so a colour is readable from a single pixel.
COLOURS = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (60, 100, 255),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
# Unit motion per frame in image coordinates: x grows to the right, y grows downwards.
DIRECTIONS = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# Dark backgrounds only: every object colour stays far brighter than all of them.
BACKGROUNDS = {
    "dark": (10, 10, 10),
    "gray": (64, 64, 64),
    "navy": (16, 22, 64),
}

# Eight of the 60 combinations, chosen so that every colour, every shape and every direction still occurs in
# training, and every pair of two attributes too (each held-out triple differs from the others in >= 2 slots).
HELD_OUT_COMBINATIONS = (
    ("red", "circle", "up"),
    ("red", "triangle", "down"),
    ("green", "square", "left"),
    ("green", "circle", "right"),
    ("blue", "triangle", "right"),
    ("blue", "square", "down"),
    ("yellow", "circle", "down"),
    ("white", "square", "up"),
)

DEFAULT_NUM_FRAMES = 16
DEFAULT_SIZE = (64, 64)
DEFAULT_FPS = 8
# At the reference size of 64 px: objects are 14-20 px wide and move 2 px per frame.
REFERENCE_EXTENT = 64
OBJECT_SIZE_RANGE = (14, 20)
SPEED = 2.0
# Edges are drawn at this multiple of the frame size and averaged down, which antialiases them.
SUPERSAMPLING = 4
# Near-lossless H.264 so the decoded colours stay close to the rendered ones.
H264_CRF = 12

CSV_COLUMNS = ("path", "text", "num_frames", "height", "width", "fps", "aspect_ratio")


def all_combinations():
    return list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def seen_combinations():
    held_out = set(HELD_OUT_COMBINATIONS)
    return [combo for combo in all_combinations() if combo not in held_out]


# Ways people write the same caption: with and without the background phrase, in another order, with or
# without the article. The first is the canonical caption; those without {background} are the short ones.
CAPTION_TEMPLATES = (
    "a {colour} {shape} {verb} {direction} on a {background} background",
    "a {colour} {shape} on a {background} background {verb} {direction}",
    "on a {background} background, a {colour} {shape} {verb} {direction}",
    "a {colour} {shape} {verb} {direction}",
    "{colour} {shape} {verb} {direction}",
)
MOTION_VERBS = ("moving", "going", "heading")


def caption(colour, shape, direction, background, template=CAPTION_TEMPLATES[0], verb="moving"):
    """The caption of a clip; the defaults give the canonical "a red circle moving left on a dark background"."""
    return template.format(colour=colour, shape=shape, verb=verb, direction=direction, background=background)


def short_templates():
    return [template for template in CAPTION_TEMPLATES if "{background}" not in template]


def long_templates():
    return [template for template in CAPTION_TEMPLATES if "{background}" in template]


def random_caption(rng, colour, shape, direction, background):
    """A caption in one of the ways people write it: template and verb drawn uniformly."""
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return caption(colour, shape, direction, background, template, MOTION_VERBS[rng.integers(len(MOTION_VERBS))])


def all_captions():
    """Every caption any template and verb can write, for every combination and background."""
    return [
        caption(colour, shape, direction, background, template, verb)
        for colour, shape, direction, background in itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)
        for template in CAPTION_TEMPLATES
        for verb in MOTION_VERBS
    ]


def parse_caption(text):
    """The attributes named by a caption of any template: {"colour", "shape", "direction", "background"}
    (background None for a short caption); UserError if it does not fit any template."""
    words = text.strip().replace(",", " ").split()
    found = {}
    for key, known in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS)):
        named = [word for word in words if word in known]
        if len(named) != 1:
            raise UserError(
                f"caption {text!r}: names {len(named)} {key}s, needs exactly one of {sorted(known)}; "
                "write it like 'a red circle moving left on a dark background'"
            )
        found[key] = named[0]
    backgrounds = [words[i - 1] for i in range(1, len(words)) if words[i] == "background"]
    found["background"] = backgrounds[0] if backgrounds else None
    for template, verb in itertools.product(CAPTION_TEMPLATES, MOTION_VERBS):
        if caption(**found, template=template, verb=verb) == text.strip():
            return found
    raise UserError(
        f"caption {text!r}: not written the way toy_world.synthetic.caption writes captions, e.g. "
        f"{caption('red', 'circle', 'left', 'dark')!r} or {caption('red', 'circle', 'left', None, short_templates()[0])!r}"
    )


def caption_vocabulary():
    """Every word a caption can contain."""
    return sorted({word for text in all_captions() for word in text.replace(",", " ").split()})


def check_settings(num_frames, height, width, fps):
    if num_frames < 2:
        raise UserError(f"num_frames={num_frames}: a moving object needs at least 2 frames; pass --num-frames >= 2")
    for name, value in (("height", height), ("width", width)):
        if value < 16 or value % 2:
            raise UserError(f"{name}={value}: must be an even number >= 16 (H.264 yuv420p); pass e.g. --size 64 64")
    if fps <= 0:
        raise UserError(f"fps={fps}: must be positive; pass e.g. 8")


def sample_clip(rng, combination, height, width):
    """Draw the random parameters of one clip: background, object size, start position and speed (pixels).

    The object starts fully in view anywhere in the frame, whatever its direction, and may leave the frame
    before the clip ends. Were the start position chosen so that the whole path fits, an object near the left
    edge would always move right, and a model could read the direction off the first frame instead of
    learning it from the caption (a model trained that way ignored the caption's direction).
    """
    colour, shape, direction = combination
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    scale = min(height, width) / REFERENCE_EXTENT
    size = rng.uniform(*OBJECT_SIZE_RANGE) * scale
    start = tuple(rng.uniform(size / 2 + 1, extent - size / 2 - 1) for extent in (width, height))
    return {
        "colour": colour,
        "shape": shape,
        "direction": direction,
        "background": background,
        "size": size,
        "speed": SPEED * scale,
        "start": start,
    }


def object_centre(clip, frame_index):
    dx, dy = DIRECTIONS[clip["direction"]]
    x0, y0 = clip["start"]
    return x0 + dx * clip["speed"] * frame_index, y0 + dy * clip["speed"] * frame_index


def render_frame(clip, frame_index, height, width):
    """One RGB frame [H, W, 3] uint8."""
    s = SUPERSAMPLING
    image = Image.new("RGB", (width * s, height * s), BACKGROUNDS[clip["background"]])
    draw = ImageDraw.Draw(image)
    cx, cy = (v * s for v in object_centre(clip, frame_index))
    r = clip["size"] * s / 2
    fill = COLOURS[clip["colour"]]
    if clip["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif clip["shape"] == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # triangle pointing up, inscribed in the same box as the square
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return np.asarray(image.resize((width, height), Image.BOX))


def render_clip(clip, num_frames, height, width):
    """All frames of a clip: [T, H, W, 3] uint8."""
    return np.stack([render_frame(clip, t, height, width) for t in range(num_frames)])


def write_split(output_dir, split, combinations, num_clips, seed, num_frames, height, width, fps):
    """Render `num_clips` clips cycling through `combinations`; return their meta rows."""
    split_index = {"train": 0, "heldout": 1}[split]
    rows = []
    for index in range(num_clips):
        rng = np.random.default_rng([seed, split_index, index])
        clip = sample_clip(rng, combinations[index % len(combinations)], height, width)
        relative_path = f"videos/{split}/{index:06d}.mp4"
        data = encode_mp4(render_clip(clip, num_frames, height, width), fps, crf=H264_CRF)
        with atomic_path(os.path.join(output_dir, relative_path)) as tmp_path:
            with open(tmp_path, "wb") as f:
                f.write(data)
        # The caption has its own random stream, so the rendered clips do not depend on how it is written.
        caption_rng = np.random.default_rng([seed, split_index, index, 1])
        text = random_caption(caption_rng, clip["colour"], clip["shape"], clip["direction"], clip["background"])
        rows.append([relative_path, text, num_frames, height, width, fps, f"{height / width:.4f}"])
    return rows


def write_csv(path, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_dataset(
    output_dir,
    num_clips=2000,
    num_heldout_clips_per_combination=3,
    seed=0,
    num_frames=DEFAULT_NUM_FRAMES,
    size=DEFAULT_SIZE,
    fps=DEFAULT_FPS,
):
    """Render the training and held-out splits into `output_dir`; return the paths of the two CSVs.

    The training split cycles through the 52 seen combinations; the held-out split renders every held-out
    combination `num_heldout_clips_per_combination` times. The CSVs are written last, so a CSV on disk always
    refers to complete videos.
    """
    height, width = size
    check_settings(num_frames, height, width, fps)
    if num_clips <= 0:
        raise UserError(f"num_clips={num_clips}: must be positive; pass e.g. --num-clips 2000")
    if num_heldout_clips_per_combination < 0:
        raise UserError(f"heldout clips per combination={num_heldout_clips_per_combination}: must be >= 0")
    settings = (seed, num_frames, height, width, fps)
    train_rows = write_split(output_dir, "train", seen_combinations(), num_clips, *settings)
    heldout_combinations = list(HELD_OUT_COMBINATIONS)
    num_heldout = num_heldout_clips_per_combination * len(heldout_combinations)
    heldout_rows = write_split(output_dir, "heldout", heldout_combinations, num_heldout, *settings)

    description = {
        "seen": [list(combo) for combo in seen_combinations()],
        "held_out": [list(combo) for combo in HELD_OUT_COMBINATIONS],
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "backgrounds": {name: list(rgb) for name, rgb in BACKGROUNDS.items()},
        "directions": {name: list(step) for name, step in DIRECTIONS.items()},
        "seed": seed,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "fps": fps,
    }
    write_text_atomic(os.path.join(output_dir, "combinations.json"), json.dumps(description, indent=2) + "\n")
    train_csv = os.path.join(output_dir, "train.csv")
    heldout_csv = os.path.join(output_dir, "heldout.csv")
    write_csv(train_csv, train_rows)
    write_csv(heldout_csv, heldout_rows)
    return train_csv, heldout_csv
