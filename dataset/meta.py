"""Build a meta CSV (path,text,num_frames,height,width,fps,aspect_ratio) from a folder of videos/images."""

import csv
import os

import av
from PIL import UnidentifiedImageError

from utils.errors import UserError
from utils.io import atomic_path
from utils.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, probe
META_COLUMNS = ("path", "text", "num_frames", "height", "width", "fps", "aspect_ratio")


def read_captions(captions_path):
    """{relative path: caption} from a CSV with columns path,text."""
    if not os.path.isfile(captions_path):
        raise UserError(f"--captions {captions_path}: file not found")
    with open(captions_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"path", "text"} <= set(reader.fieldnames or []):
            raise UserError(f"--captions {captions_path}: needs the columns path,text (path relative to --video-dir)")
        return {os.path.normpath(row["path"]): row["text"] for row in reader}


def build_meta(video_dir, captions_path=None):
    """Meta rows for every media file under `video_dir` and the number of unreadable files skipped.

    Captions come from `captions_path` or, without it, from a sidecar `<name>.txt` next to each file;
    files without a caption are skipped too.
    """
    if not os.path.isdir(video_dir):
        raise UserError(f"--video-dir {video_dir}: not a directory")
    captions = read_captions(captions_path) if captions_path else None
    rows, unreadable, uncaptioned = [], [], []
    for root, _, files in os.walk(video_dir):
        for name in sorted(files):
            if not name.lower().endswith(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS):
                continue
            path = os.path.join(root, name)
            relative = os.path.normpath(os.path.relpath(path, video_dir))
            if captions is not None:
                text = captions.get(relative)
            else:
                sidecar = os.path.splitext(path)[0] + ".txt"
                text = open(sidecar, encoding="utf-8").read().strip() if os.path.isfile(sidecar) else None
            if not text:
                uncaptioned.append(relative)
                continue
            try:
                num_frames, height, width, fps = probe(path)
            except (av.error.FFmpegError, OSError, ValueError, UnidentifiedImageError, IndexError):
                unreadable.append(relative)
                continue
            rows.append(dict(path=relative, text=text, num_frames=num_frames, height=height, width=width,
                             fps=round(fps, 3), aspect_ratio=round(height / width, 4)))
    rows.sort(key=lambda row: row["path"])
    return rows, unreadable, uncaptioned


def write_meta(rows, output_path, video_dir):
    """Write rows with paths relative to the CSV's folder."""
    output_dir = os.path.dirname(os.path.abspath(output_path))
    with atomic_path(output_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=META_COLUMNS)
            writer.writeheader()
            for row in rows:
                path = os.path.relpath(os.path.join(os.path.abspath(video_dir), row["path"]), output_dir)
                writer.writerow({**row, "path": path})
