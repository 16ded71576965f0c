"""Reading, probing and writing images and videos: the one place that knows about files of frames.

Frames are uint8 arrays [T, H, W, 3] (RGB) or PIL images; videos are written as H.264 mp4. Imports nothing
of the project but the error type and the atomic-write helpers.
"""

import io
import os
import tempfile
from typing import NamedTuple

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.errors import UserError
from utils.io import apply_default_permissions

IMAGE_FPS = 120  # the fps condition of single images, as in the original
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
DEFAULT_VIDEO_FPS = 24.0  # for streams that do not say


class MediaInfo(NamedTuple):
    num_frames: int
    height: int
    width: int
    fps: float


def is_image(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def probe(path):
    """MediaInfo of an image (1 frame at IMAGE_FPS) or video file; ValueError, OSError or av errors when it
    cannot be read. Images are fully decoded: `Image.verify()` passes truncated files."""
    if is_image(path):
        with Image.open(path) as image:
            image.load()
            return MediaInfo(1, image.height, image.width, float(IMAGE_FPS))
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("has no video stream")
        stream = container.streams.video[0]
        num_frames = sum(1 for _ in container.decode(stream))
        if num_frames == 0:
            raise ValueError("has no decodable frames (truncated or corrupt?)")
        fps = float(stream.average_rate or 0) or DEFAULT_VIDEO_FPS
        return MediaInfo(num_frames, stream.codec_context.height, stream.codec_context.width, fps)


def probe_or_explain(path, what="reference"):
    """`probe(path)` with every failure turned into a one-line UserError naming the file."""
    if not os.path.exists(path):
        raise UserError(f"{what} {path}: file not found")
    if os.path.isdir(path):
        raise UserError(f"{what} {path}: is a directory; give an image or video file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} {path}: the file is empty")
    try:
        return probe(path)
    except (UnidentifiedImageError, SyntaxError) as error:
        raise UserError(f"{what} {path}: not a readable image ({error})") from None
    except (ValueError, OSError, av.error.FFmpegError) as error:
        kind = "image" if is_image(path) else "image or video"
        raise UserError(f"{what} {path}: not a readable {kind} ({error})") from None


def read_frames(path):
    """Every frame of an image or video file as PIL RGB images."""
    if is_image(path):
        with Image.open(path) as image:
            return [image.convert("RGB")]
    with av.open(path) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def read_video_frames(path, frame_indices):
    """Decode only the frames at the (sorted) indices; seeks to the keyframe before the first one when the
    stream gives timestamps. Returns PIL images."""
    wanted = set(frame_indices)
    last = max(frame_indices)
    frames = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 0)
        use_time = rate > 0 and stream.time_base is not None
        if use_time and min(frame_indices) > 0:
            container.seek(int(min(frame_indices) / rate / stream.time_base), stream=stream, backward=True)
        for position, frame in enumerate(container.decode(stream)):
            index = round(frame.time * rate) if use_time and frame.time is not None else position
            if index in wanted:
                frames[index] = frame.to_image()
            if index >= last:
                break
    missing = [i for i in frame_indices if i not in frames]
    if missing:
        raise ValueError(f"frames {missing[:3]} could not be decoded")
    return [frames[i] for i in frame_indices]


def resize_crop(frame, height, width, transform_name="resize_crop"):
    """PIL image -> uint8 array [height, width, 3]: scale so it covers the target, then centre-crop.

    "center" crops the centre at native resolution and only scales up when the frame is too small.
    """
    scale = max(height / frame.height, width / frame.width)
    if transform_name == "center":
        scale = max(scale, 1.0)
    if scale != 1.0:
        size = (max(width, round(frame.width * scale)), max(height, round(frame.height * scale)))
        frame = frame.resize(size, Image.BICUBIC)
    left, top = (frame.width - width) // 2, (frame.height - height) // 2
    return np.asarray(frame.crop((left, top, left + width, top + height)).convert("RGB"))


def write_mp4(frames, fps, target, crf=18):
    """uint8 [T, H, W, 3] as H.264 yuv420p into `target` (a path or a binary file); odd sizes are padded by one
    pixel (yuv420p needs even sizes). The bytes depend only on the frames and settings."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # One thread keeps the bytes identical across machines; no creation time keeps them identical across runs.
        stream.options = {"crf": str(crf), "threads": "1"}
        container.metadata["creation_time"] = "1970-01-01T00:00:00Z"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def encode_mp4(frames, fps, crf=18):
    """The bytes `write_mp4` would write."""
    buffer = io.BytesIO()
    write_mp4(frames, fps, buffer, crf)
    return buffer.getvalue()


def save_video(frames, fps, save_path, overwrite=False):
    """Write uint8 frames [T, H, W, 3] as `save_path`.mp4 (H.264), or .png for a single frame; returns the path.

    The file is written under a temporary name and moved into place, so it is complete or absent. Unless
    `overwrite`, an existing file is never replaced: the name gets `_1`, `_2`, ... instead, and the no-clobber
    step is atomic between processes (a hard link fails when the name is taken).
    """
    extension = ".png" if len(frames) == 1 else ".mp4"
    directory = os.path.dirname(os.path.abspath(save_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sample.", suffix=extension + ".tmp", dir=directory)
    os.close(fd)
    try:
        if extension == ".png":
            Image.fromarray(frames[0]).save(tmp, format="PNG")
        else:
            write_mp4(frames, fps, tmp)
        apply_default_permissions(tmp)
        if overwrite:
            os.replace(tmp, save_path + extension)
            return save_path + extension
        for attempt in range(10000):
            final = save_path + ("" if attempt == 0 else f"_{attempt}") + extension
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            return final
        raise UserError(f"{save_path}: too many existing outputs with this name; use another --sample-name or --save-dir")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
