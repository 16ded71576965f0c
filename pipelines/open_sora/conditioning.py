"""Image and video conditions of a generation: references and the frames they fix (Open-Sora v1.1's mask
strategies, as objects).

A `MaskGroup` copies `length` frames of reference `reference`, starting at its frame `source_start`, into the
generated clip of loop `loop` at frame `target_start` (negative starts count from the end), and gives them
the frame-mask value `edit_ratio` (0 keeps them, up to 1 regenerates them). Frames are counted in pixels
here; `latent_span` converts a group to latent frames with the VAE's own frame-to-latent map, in one place.
"""

import dataclasses
from typing import Sequence

import numpy as np
import paddle
from PIL import Image

from utils.errors import UserError
from utils.media import probe_or_explain, read_frames, resize_crop


class MaskGroupError(UserError):
    """A mask group that cannot be applied; `problem` says why without naming the group, so that the command
    line can name it in its own syntax."""

    def __init__(self, group, problem):
        super().__init__(f"{group}: {problem}")
        self.group, self.problem = group, problem


@dataclasses.dataclass(frozen=True)
class MaskGroup:
    loop: int = 0
    reference: int = 0
    source_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_ratio: float = 0.0

    def __post_init__(self):
        if self.loop < 0 or self.reference < 0:
            raise MaskGroupError(self, "the loop and reference indices must not be negative")
        if self.length < 1:
            raise MaskGroupError(self, "the length must be at least 1")
        if not 0.0 <= self.edit_ratio <= 1.0:
            raise MaskGroupError(self, f"edit_ratio {self.edit_ratio} must lie in [0, 1]")

    def span(self, reference_length, clip_length):
        """(source_start, target_start) made non-negative, or a MaskGroupError when the frames do not exist."""
        source_start = self.source_start + reference_length if self.source_start < 0 else self.source_start
        target_start = self.target_start + clip_length if self.target_start < 0 else self.target_start
        if not (0 <= source_start and source_start + self.length <= reference_length):
            raise MaskGroupError(self, f"frames {source_start}..{source_start + self.length - 1} are outside reference "
                                       f"{self.reference}, which has {reference_length} frame(s)")
        if not (0 <= target_start and target_start + self.length <= clip_length):
            raise MaskGroupError(self, f"target frames {target_start}..{target_start + self.length - 1} do not fit in "
                                       f"a clip of {clip_length} frames")
        return source_start, target_start


def snap_to_chunk(index, chunk, num_latent_frames):
    """A latent start moved to the nearest multiple of `chunk` (halves go down) that leaves a whole chunk in the
    clip's `num_latent_frames`, as Open-Sora v1.2's `align` does."""
    chunks_before = index // chunk
    if index % chunk > chunk / 2 and chunks_before < num_latent_frames // chunk - 1:
        chunks_before += 1
    return chunks_before * chunk


def latent_span(group, reference_length, clip_length, vae, align=1):
    """A pixel-frame MaskGroup as latent (source_start, target_start, length) for a reference of
    `reference_length` and a clip of `clip_length` pixel frames. `vae.latent_frame_index` says which latent
    frame holds a pixel frame; `align` > 1 moves both starts to the nearest multiple of it, and the length is
    cut to what the reference and the clip hold from there (Open-Sora v1.2)."""
    source_start, target_start = group.span(reference_length, clip_length)
    reference_latents = vae.latent_frame_index(reference_length - 1, reference_length) + 1
    clip_latents = vae.latent_frame_index(clip_length - 1, clip_length) + 1
    source = vae.latent_frame_index(source_start, reference_length)
    length = vae.latent_frame_index(source_start + group.length - 1, reference_length) - source + 1
    target = vae.latent_frame_index(target_start, clip_length)
    if align > 1:
        source = snap_to_chunk(source, align, reference_latents)
        target = snap_to_chunk(target, align, clip_latents)
    return source, target, min(length, reference_latents - source, clip_latents - target)


class Reference:
    """An image or a video that conditions a generation: a file path, a PIL image, or uint8 frames
    ([H, W, 3] for an image, [T, H, W, 3] for a video). Files are checked when the Reference is made and read
    once, at the size of the generation."""

    def __init__(self, source):
        if isinstance(source, Reference):
            source = source.source
        if isinstance(source, str):
            self.num_frames = probe_or_explain(source).num_frames
        elif isinstance(source, Image.Image):
            self.num_frames = 1
        else:
            source = np.asarray(source)
            if source.dtype != np.uint8 or source.ndim not in (3, 4) or source.shape[-1] != 3:
                raise UserError(f"reference array of shape {source.shape} and dtype {source.dtype}: give uint8 "
                                "frames [H, W, 3] or [T, H, W, 3]")
            source = source[None] if source.ndim == 3 else source
            self.num_frames = len(source)
        self.source = source

    def pixels(self, height, width):
        """float32 [3, T, height, width] in [-1, 1]: resized (short side) and centre-cropped."""
        if isinstance(self.source, str):
            images = read_frames(self.source)
        elif isinstance(self.source, Image.Image):
            images = [self.source.convert("RGB")]
        else:
            images = [Image.fromarray(frame) for frame in self.source]
        frames = np.stack([resize_crop(image, height, width) for image in images])
        return frames.transpose(3, 0, 1, 2).astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class Conditions:
    """References and the mask groups that place their frames. References without groups condition the
    first frame on the first reference, as Open-Sora's image-to-video does."""

    references: Sequence[Reference] = ()
    mask_groups: Sequence[MaskGroup] = ()

    def __post_init__(self):
        references = tuple(r if isinstance(r, Reference) else Reference(r) for r in self.references)
        mask_groups = tuple(self.mask_groups) or ((MaskGroup(),) if references else ())
        object.__setattr__(self, "references", references)
        object.__setattr__(self, "mask_groups", mask_groups)
        for group in mask_groups:
            if group.reference >= len(references):
                raise MaskGroupError(group, f"reference {group.reference} does not exist ({len(references)} given)")

    def check(self, num_frames, num_loops):
        """Every group's frames exist in its reference and fit in the clip of a loop that is generated."""
        for group in self.mask_groups:
            if group.loop >= num_loops:
                raise MaskGroupError(group, f"loop {group.loop} is not generated ({num_loops} loop(s))")
            group.span(self.references[group.reference].num_frames, num_frames)

    @classmethod
    def image_to_video(cls, image):
        """The image is the first frame."""
        return cls([image])

    @classmethod
    def connect(cls, first, last):
        """The first image starts the clip and the second ends it."""
        return cls([first, last], [MaskGroup(reference=0), MaskGroup(reference=1, target_start=-1)])

    @classmethod
    def extend(cls, video, num_frames):
        """The last `num_frames` frames of the video start the clip."""
        return cls([video], [MaskGroup(source_start=-num_frames, length=num_frames)])

    @classmethod
    def edit(cls, video, edit_ratio):
        """Every frame of the video, regenerated by `edit_ratio` (0 keeps it, 1 ignores it)."""
        reference = Reference(video)
        return cls([reference], [MaskGroup(length=reference.num_frames, edit_ratio=edit_ratio)])


@dataclasses.dataclass
class EncodedConditions:
    """One video's conditions during sampling: the latents [C, T, h, w] of its references, their lengths in
    pixel frames, and the groups that place them. Loops append the end of the previous clip."""

    latents: list
    lengths: list
    mask_groups: list

    def copy(self):
        return EncodedConditions(list(self.latents), list(self.lengths), list(self.mask_groups))

    def add_loop_reference(self, latents, length, loop):
        """The `length` pixel frames encoded in `latents` start the clip of loop `loop`."""
        self.mask_groups.append(MaskGroup(loop=loop, reference=len(self.latents), source_start=0, length=length))
        self.latents.append(latents)
        self.lengths.append(length)


def fill_conditioned_frames(z, conditions, loop, clip_length, vae, align=1):
    """Copy the reference latent frames of loop `loop` into z [B, C, T, h, w] (in place) and return the frame
    mask [B, T]: 1 = generate, `edit_ratio` for conditioned frames. `conditions`: EncodedConditions per item;
    `vae` and `align` place pixel frames in latent frames (`latent_span`)."""
    masks = np.ones((z.shape[0], z.shape[2]), dtype=np.float32)
    for i, item in enumerate(conditions):
        for group in item.mask_groups:
            if group.loop != loop:
                continue
            source, target, length = latent_span(group, item.lengths[group.reference], clip_length, vae, align)
            z[i, :, target : target + length] = item.latents[group.reference][:, source : source + length]
            masks[i, target : target + length] = group.edit_ratio
    return paddle.to_tensor(masks)
