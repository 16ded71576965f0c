"""Random frame masks for training: which frames of a clip are given (conditioning) and which are generated.

Training with these masks is what lets one model do image-to-video, connecting, extending and editing.
Mask names and default ratios are those of Open-Sora v1.1.
"""

import math
import random

import numpy as np

MASK_NAMES = (
    "mask_no",
    "mask_quarter_random",
    "mask_quarter_head",
    "mask_quarter_tail",
    "mask_quarter_head_tail",
    "mask_image_random",
    "mask_image_head",
    "mask_image_tail",
    "mask_image_head_tail",
)

DEFAULT_MASK_RATIOS = {
    "mask_no": 0.75,
    "mask_quarter_random": 0.025,
    "mask_quarter_head": 0.025,
    "mask_quarter_tail": 0.025,
    "mask_quarter_head_tail": 0.05,
    "mask_image_random": 0.025,
    "mask_image_head": 0.025,
    "mask_image_tail": 0.025,
    "mask_image_head_tail": 0.05,
}


class MaskGenerator:
    """Draws one mask type per sample with the given probabilities.

    A mask is a bool array [T]: True = frame to generate, False = conditioning frame. "quarter" masks give
    1..T//4 frames, "image" masks one frame, at a random position, the head, the tail, or both ends.
    """

    def __init__(self, mask_ratios=None, rng=None):
        mask_ratios = dict(DEFAULT_MASK_RATIOS if mask_ratios is None else mask_ratios)
        unknown = sorted(set(mask_ratios) - set(MASK_NAMES))
        if unknown:
            raise ValueError(f"unknown mask names {unknown}; choose from {list(MASK_NAMES)}")
        if any(not 0 <= ratio <= 1 for ratio in mask_ratios.values()):
            raise ValueError(f"mask ratios must lie in [0, 1], got {mask_ratios}")
        if not math.isclose(sum(mask_ratios.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"mask ratios must sum to 1, got {sum(mask_ratios.values())}")
        self.mask_ratios = mask_ratios
        self.names = list(mask_ratios)
        self.cumulative = np.cumsum([mask_ratios[name] for name in self.names])
        # Python's `random` is seeded by the Trainer and saved in its checkpoints, so resumed runs continue
        # the same sequence of masks.
        self.rng = rng or random

    def sample_name(self):
        index = int(np.searchsorted(self.cumulative, self.rng.random(), side="right"))
        return self.names[min(index, len(self.names) - 1)]

    def get_mask(self, num_frames, mask_name=None):
        mask_name = mask_name or self.sample_name()
        mask = np.ones(num_frames, dtype=bool)
        if num_frames <= 1 or mask_name == "mask_no":
            return mask
        if mask_name.startswith("mask_quarter"):
            size = self.rng.randint(1, max(1, num_frames // 4))
        else:
            size = 1
        if mask_name.endswith("_random"):
            start = self.rng.randint(0, num_frames - size)
            mask[start : start + size] = False
        if mask_name.endswith(("_head", "_head_tail")):
            mask[:size] = False
        if mask_name.endswith(("_tail",)):
            mask[-size:] = False
        return mask

    def get_masks(self, batch_size, num_frames):
        """Bool array [batch_size, num_frames]."""
        return np.stack([self.get_mask(num_frames) for _ in range(batch_size)])
