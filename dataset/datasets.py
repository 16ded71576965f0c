"""Video-text training data read from meta CSV files.

Meta CSV columns: `path,text,num_frames,height,width` and optionally `fps,aspect_ratio`; paths relative to
the CSV resolve against the CSV's folder. Several CSVs are given as one comma-separated string.
A sample is `frames` frames taken every `frame_interval` frames from a random start, resized (short side)
and centre-cropped to the target size, in [-1, 1]. Images are single-frame samples.
"""

import csv
import logging
import os

import av
import numpy as np
import paddle
from PIL import Image

from utils.errors import UserError
from utils.media import IMAGE_FPS, is_image, read_video_frames, resize_crop

REQUIRED_COLUMNS = ("path", "text", "num_frames", "height", "width")
DEFAULT_FPS = 24  # used when a CSV has no fps column, as the original assumes
TRANSFORMS = ("resize_crop", "center")

logger = logging.getLogger(__name__)


def read_meta_csv(data_path):
    """Rows of one or more meta CSVs (comma-separated paths) with absolute paths and numeric fields."""
    rows = []
    for csv_path in [p.strip() for p in str(data_path).split(",") if p.strip()]:
        if not os.path.isfile(csv_path):
            raise UserError(f"{csv_path}: meta CSV not found; build one with scripts/make_meta.py")
        base = os.path.dirname(os.path.abspath(csv_path))
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{csv_path}: missing columns {missing}; a meta CSV needs {list(REQUIRED_COLUMNS)}")
            for line, row in enumerate(reader, start=2):
                rows.append(parse_row(row, base, f"{csv_path} line {line}"))
        if not rows:
            raise UserError(f"{csv_path}: no rows; add clips or use another CSV")
    return rows


def parse_row(row, base, where):
    parsed = dict(path=os.path.join(base, row["path"]), text=row["text"] or "")
    for column, cast in (("num_frames", int), ("height", int), ("width", int)):
        try:
            parsed[column] = cast(float(row[column]))
        except (TypeError, ValueError):
            raise UserError(f"{where}: column {column} is {row[column]!r}, not a number; fix the CSV (scripts/make_meta.py writes valid ones)") from None
        if parsed[column] <= 0:
            raise UserError(f"{where}: column {column} must be positive, got {parsed[column]}")
    for column, default in (("fps", DEFAULT_FPS), ("aspect_ratio", parsed["height"] / parsed["width"])):
        value = row.get(column)
        try:
            parsed[column] = float(value) if value not in (None, "") else float(default)
        except ValueError:
            raise UserError(f"{where}: column {column} is {value!r}, not a number; fix the CSV") from None
    if not os.path.isfile(parsed["path"]):
        raise UserError(f"{where}: file {row['path']} not found (resolved to {parsed['path']}); fix the path or remove the row")
    return parsed


class VariableVideoTextDataset(paddle.io.Dataset):
    """Meta-CSV clips at a fixed size, or at a per-batch size chosen by the bucket sampler.

    An index is an int (use `num_frames` and `image_size`) or `(index, num_frames, height, width)`.
    """

    def __init__(self, data_path, frame_interval=1, transform_name="resize_crop", num_frames=16,
                 image_size=(64, 64), max_samples=None, random_start=True, seed=0):
        if transform_name not in TRANSFORMS:
            raise UserError(f"transform {transform_name!r} is not one of {list(TRANSFORMS)}")
        if frame_interval < 1 or num_frames < 1:
            raise UserError(f"frame_interval ({frame_interval}) and num_frames ({num_frames}) must be positive")
        self.rows = read_meta_csv(data_path)[:max_samples]
        self.frame_interval = frame_interval
        self.transform_name = transform_name
        self.num_frames = num_frames
        self.image_size = tuple(image_size)
        self.random_start = random_start
        self.seed = seed
        self.epoch = 0
        self._reported = set()

    def __len__(self):
        return len(self.rows)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def load(self, index, num_frames, height, width):
        row = self.rows[index]
        if is_image(row["path"]):
            with Image.open(row["path"]) as image:
                frames = [image.convert("RGB")]
            fps = IMAGE_FPS
        else:
            span = (num_frames - 1) * self.frame_interval + 1
            if row["num_frames"] < span:
                raise ValueError(f"has {row['num_frames']} frames, fewer than the {span} needed")
            start = 0
            if self.random_start:
                rng = np.random.default_rng((self.seed, self.epoch, index))
                start = int(rng.integers(0, row["num_frames"] - span + 1))
            frames = read_video_frames(row["path"], list(range(start, start + span, self.frame_interval)))
            fps = row["fps"]
        video = np.stack([resize_crop(f, height, width, self.transform_name) for f in frames])
        video = video.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1.0  # [3, T, H, W] in [-1, 1]
        return dict(video=video, text=row["text"], num_frames=float(video.shape[1]), height=float(height),
                    width=float(width), ar=height / width, fps=float(fps))

    def __getitem__(self, index):
        if isinstance(index, (tuple, list)):
            index, num_frames, height, width = index
        else:
            num_frames, (height, width) = self.num_frames, self.image_size
        # An unreadable file is replaced by the next readable sample at the same size, so training goes on.
        for attempt in range(len(self.rows)):
            candidate = (index + attempt) % len(self.rows)
            try:
                sample = self.load(candidate, num_frames, height, width)
            except (av.error.FFmpegError, OSError, ValueError) as error:
                path = self.rows[candidate]["path"]
                if path not in self._reported:
                    self._reported.add(path)
                    logger.warning("skipping unreadable %s: %s", path, error)
                continue
            sample["num_skipped"] = int(attempt > 0)
            return sample
        raise UserError("no readable clip in the data set; check the files listed in the meta CSV")


def collate_batch(samples):
    """Stack samples (numpy, so DataLoader workers can pass them): video [B, 3, T, H, W] float32, numbers as float32 arrays [B], texts as a list."""
    batch = {"video": np.stack([s["video"] for s in samples])}
    for key in ("num_frames", "height", "width", "ar", "fps"):
        batch[key] = np.asarray([s[key] for s in samples], dtype=np.float32)
    batch["text"] = [s["text"] for s in samples]
    batch["num_skipped"] = np.asarray([s["num_skipped"] for s in samples], dtype=np.int64)
    return batch
