"""Prompt, reference and mask-strategy handling for conditioned generation (names as in Open-Sora v1.1).

A prompt may end with a JSON object: `text{"reference_path": "a.png;b.mp4", "mask_strategy": "0;0,1,0,-1,1"}`.
A mask strategy is a `;`-separated list of groups `loop_id,m_id,m_ref_start,m_target_start,m_length,edit_ratio`
(missing trailing fields default to `0,0,0,0,1,0`): in loop `loop_id`, copy `m_length` frames of reference
`m_id` starting at `m_ref_start` into the clip starting at `m_target_start` (negative starts count from the
end), and give them the frame mask value `edit_ratio` (0 = keep, up to 1 = regenerate).
"""

import json
import os
import tempfile
from typing import NamedTuple

import av
import numpy as np
import paddle
from PIL import Image, UnidentifiedImageError

from dataset.datasets import is_image, resize_crop
from models.text_encoder.t5 import text_preprocessing
from utils.errors import UserError
from utils.io import apply_default_permissions

JSON_KEYS = ("reference_path", "mask_strategy")
MASK_DEFAULTS = ("0", "0", "0", "0", "1", "0")


def short(text, limit=60):
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------- prompts


def extract_json_from_prompts(prompts):
    """Split each prompt at its first `{` into text and conditioning: returns (texts, infos)."""
    texts, infos = [], []
    for prompt in prompts:
        text, brace, tail = prompt.partition("{")
        texts.append(text)
        if not brace:
            infos.append({})
            continue
        try:
            info = json.loads(brace + tail)
        except json.JSONDecodeError as error:
            raise UserError(f"prompt {short(prompt)!r}: the JSON after the text is malformed ({error.msg}); write e.g. "
                            '{"reference_path": "a.png", "mask_strategy": "0"}') from None
        unknown = sorted(set(info) - set(JSON_KEYS))
        if unknown:
            raise UserError(f"prompt {short(prompt)!r}: unknown keys {unknown}; only {list(JSON_KEYS)} are allowed")
        for key, value in info.items():
            if not isinstance(value, str):
                raise UserError(f"prompt {short(prompt)!r}: {key} must be a string, got {json.dumps(value)}")
        infos.append(info)
    return texts, infos


def process_prompts(texts, num_loop):
    """Per-loop prompts: `|0|a dog|2|a cat` gives "a dog" to loops 0-1 and "a cat" from loop 2 on; plain
    prompts are used for every loop. Each text is cleaned as the original cleans captions before T5."""
    prompts_per_loop = []
    for text in texts:
        if not text.startswith("|"):
            prompts_per_loop.append([clean_prompt(text)] * num_loop)
            continue
        parts = text.split("|")[1:]
        if len(parts) % 2:
            raise UserError(f"prompt {short(text)!r}: loop prompts must alternate |loop|text|, e.g. |0|a dog|2|a cat")
        starts, segments = parts[0::2], parts[1::2]
        try:
            starts = [int(s) for s in starts]
        except ValueError:
            raise UserError(f"prompt {short(text)!r}: loop ids {starts} must be integers") from None
        if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= num_loop:
            raise UserError(f"prompt {short(text)!r}: loop ids {starts} must start at 0, increase, and stay below --loop {num_loop}")
        ends = starts[1:] + [num_loop]
        prompts_per_loop.append([clean_prompt(segment) for segment, a, b in zip(segments, starts, ends) for _ in range(b - a)])
    return prompts_per_loop


def clean_prompt(text):
    cleaned = text_preprocessing(text)
    if not cleaned:
        raise UserError(f"prompt {short(text)!r}: nothing is left after caption cleaning (it removes URLs, markup and "
                        "symbols); describe the video in words")
    return cleaned


# ---------------------------------------------------------------------------------------- mask strategies


class MaskGroup(NamedTuple):
    loop_id: int
    m_id: int
    m_ref_start: int
    m_target_start: int
    m_length: int
    edit_ratio: float


def parse_mask_strategy(mask_strategy, num_references=None):
    """Parse a mask strategy string into MaskGroups, checking what can be checked without the media."""
    groups = []
    for number, group in enumerate(mask_strategy.split(";"), start=1):
        fields = [field.strip() for field in group.split(",")]
        where = f'mask_strategy group {number} "{group}"'
        if not 1 <= len(fields) <= 6 or fields == [""]:
            raise UserError(f"{where}: needs 1 to 6 comma-separated fields loop_id,m_id,m_ref_start,m_target_start,m_length,edit_ratio")
        fields += MASK_DEFAULTS[len(fields):]
        try:
            values = [int(field) for field in fields[:5]] + [float(fields[5])]
        except ValueError:
            raise UserError(f"{where}: fields must be numbers (five integers, then edit_ratio)") from None
        parsed = MaskGroup(*values)
        if parsed.loop_id < 0 or parsed.m_id < 0:
            raise UserError(f"{where}: loop_id and m_id must not be negative")
        if parsed.m_length < 1:
            raise UserError(f"{where}: m_length must be at least 1")
        if not 0.0 <= parsed.edit_ratio <= 1.0:
            raise UserError(f"{where}: edit_ratio {parsed.edit_ratio} must lie in [0, 1]")
        if num_references is not None and parsed.m_id >= num_references:
            raise UserError(f"{where}: m_id {parsed.m_id} has no reference ({num_references} given: 0..{num_references - 1})")
        groups.append(parsed)
    return groups


def resolve_start(start, length):
    return start + length if start < 0 else start


def validate_mask_strategy(groups, reference_lengths, num_frames):
    """Check that each group's frames exist in its reference and fit in the generated clip."""
    for number, group in enumerate(groups, start=1):
        text = ",".join(str(value) for value in group)
        where = f'mask_strategy group {number} "{text}"'
        ref_length = reference_lengths[group.m_id]
        ref_start = resolve_start(group.m_ref_start, ref_length)
        if not (0 <= ref_start and ref_start + group.m_length <= ref_length):
            raise UserError(f"{where}: frames {ref_start}..{ref_start + group.m_length - 1} are outside reference {group.m_id}, which has {ref_length} frame(s)")
        target_start = resolve_start(group.m_target_start, num_frames)
        if not (0 <= target_start and target_start + group.m_length <= num_frames):
            raise UserError(f"{where}: target frames {target_start}..{target_start + group.m_length - 1} do not fit in --num-frames {num_frames}")


def apply_mask_strategy(z, reference_latents, mask_strategies, loop_i):
    """Copy reference latent frames into z [B, C, T, H, W] (in place) and return the frame mask [B, T]."""
    num_frames = z.shape[2]
    masks = np.ones((z.shape[0], num_frames), dtype=np.float32)
    for i, strategy in enumerate(mask_strategies):
        if not strategy:
            continue
        for group in parse_mask_strategy(strategy):
            if group.loop_id != loop_i:
                continue
            reference = reference_latents[i][group.m_id]  # [C, T_ref, H, W]
            ref_start = resolve_start(group.m_ref_start, reference.shape[1])
            target_start = resolve_start(group.m_target_start, num_frames)
            z[i, :, target_start : target_start + group.m_length] = reference[:, ref_start : ref_start + group.m_length]
            masks[i, target_start : target_start + group.m_length] = group.edit_ratio
    return paddle.to_tensor(masks)


# ------------------------------------------------------------------------------------------- references


def check_readable(path):
    if not os.path.exists(path):
        raise UserError(f"reference {path}: file not found")
    if os.path.isdir(path):
        raise UserError(f"reference {path}: is a directory; give an image or video file")
    if os.path.getsize(path) == 0:
        raise UserError(f"reference {path}: the file is empty")


def probe_reference(path):
    """Number of frames of a reference image (1) or video; a clear error for anything unreadable."""
    check_readable(path)
    if is_image(path):
        try:
            # A full decode, not Image.verify(): verify passes truncated JPEGs.
            with Image.open(path) as image:
                image.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise UserError(f"reference {path}: not a readable image ({error})") from None
        return 1
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise UserError(f"reference {path}: has no video stream")
            count = sum(1 for _ in container.decode(video=0))
    except av.error.FFmpegError as error:
        raise UserError(f"reference {path}: not a readable image or video ({error})") from None
    if count == 0:
        raise UserError(f"reference {path}: no decodable frames (truncated or corrupt?)")
    return count


def read_from_path(path, image_size):
    """A reference as float32 [3, T, H, W] in [-1, 1], resized (short side) and centre-cropped."""
    height, width = image_size
    check_readable(path)
    try:
        if is_image(path):
            with Image.open(path) as image:
                frames = [resize_crop(image, height, width)]
        else:
            with av.open(path) as container:
                frames = [resize_crop(frame.to_image(), height, width) for frame in container.decode(video=0)]
    except (UnidentifiedImageError, OSError, av.error.FFmpegError) as error:
        raise UserError(f"reference {path}: cannot be read ({error})") from None
    if not frames:
        raise UserError(f"reference {path}: no decodable frames (truncated or corrupt?)")
    return np.stack(frames).transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1.0


def collect_references(reference_paths, vae, image_size):
    """Per batch item, the VAE latents [C, T, h, w] of each of its `;`-separated references."""
    references = []
    for paths in reference_paths:
        latents = []
        for path in (paths.split(";") if paths else []):
            video = paddle.to_tensor(read_from_path(path, image_size))[None]
            latents.append(vae.encode(video)[0])
        references.append(latents)
    return references


# ----------------------------------------------------------------------------------------------- loops


def default_condition_frame_length(num_frames):
    """Frames of the previous clip that condition the next one when --loop > 1 gives none: a quarter."""
    return max(1, num_frames // 4)


def add_loop_condition(references, mask_strategies, previous_latents, loop_i, condition_frame_length):
    """New reference and strategy lists where each item's last clip conditions the start of loop `loop_i`."""
    new_references, new_strategies = [], []
    for i, (refs, strategy) in enumerate(zip(references, mask_strategies)):
        group = f"{loop_i},{len(refs)},-{condition_frame_length},0,{condition_frame_length}"
        new_references.append(list(refs) + [previous_latents[i]])
        new_strategies.append(f"{strategy};{group}" if strategy else group)
    return new_references, new_strategies


def concat_loop_clips(clips, condition_frame_length):
    """Per item: the first clip, then each later clip without its conditioning frames. clips: [B, 3, T, H, W] each."""
    videos = []
    for i in range(clips[0].shape[0]):
        parts = [clips[0][i]] + [clip[i][:, condition_frame_length:] for clip in clips[1:]]
        videos.append(paddle.concat(parts, axis=1) if len(parts) > 1 else parts[0])
    return videos


# ---------------------------------------------------------------------------------------------- saving


def to_uint8_frames(video):
    """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    video = np.asarray(video.numpy() if hasattr(video, "numpy") else video, dtype=np.float32)
    return ((video.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 3, 0)


def save_sample(video, fps, save_path, overwrite=False):
    """Write [3, T, H, W] in [-1, 1] as `save_path`.mp4 (H.264), or .png for a single frame; returns the path.

    The file is written under a temporary name and moved into place, so it is complete or absent. Unless
    `overwrite`, an existing file is never replaced: the name gets `_1`, `_2`, ... instead, and the no-clobber
    step is atomic between processes (a hard link fails when the name is taken).
    """
    frames = to_uint8_frames(video)
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


def write_mp4(frames, fps, path):
    """H.264 yuv420p; odd sizes are padded by one pixel (yuv420p needs even sizes)."""
    T, H, W, _ = frames.shape
    pad_h, pad_w = H % 2, W % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # One thread keeps the bytes identical across machines; no creation time keeps them identical across runs.
        stream.options = {"crf": "18", "threads": "1"}
        container.metadata["creation_time"] = "1970-01-01T00:00:00Z"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
