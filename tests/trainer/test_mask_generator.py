import random
from collections import Counter

import numpy as np
import pytest

from trainer.mask_generator import DEFAULT_MASK_RATIOS, MaskGenerator


def classify(mask):
    """Name of the v1.1 mask type that produced `mask` (the ambiguous quarter/image cases of size 1 merge)."""
    given = np.flatnonzero(~mask)
    if len(given) == 0:
        return "mask_no"
    head, tail = given[0] == 0, given[-1] == len(mask) - 1
    runs = np.split(given, np.flatnonzero(np.diff(given) != 1) + 1)
    if len(runs) == 2 and head and tail:
        return "head_tail"
    if head:
        return "head"
    if tail:
        return "tail"
    return "random"


def test_mask_frequencies_match_ratios():
    generator = MaskGenerator(rng=random.Random(0))
    draws = 40000
    counts = Counter(generator.sample_name() for _ in range(draws))
    for name, ratio in DEFAULT_MASK_RATIOS.items():
        assert abs(counts[name] / draws - ratio) < 4 * np.sqrt(ratio * (1 - ratio) / draws) + 1e-3, name


def test_mask_shapes_follow_their_names():
    generator = MaskGenerator(rng=random.Random(1))
    T = 16
    for name in DEFAULT_MASK_RATIOS:
        for _ in range(50):
            mask = generator.get_mask(T, name)
            given = (~mask).sum()
            if name == "mask_no":
                assert given == 0
                continue
            kind = name.split("_", 2)[2]
            per_end = given // 2 if kind == "head_tail" else given
            if name.startswith("mask_image"):
                assert per_end == 1
            else:
                assert 1 <= per_end <= T // 4
            assert classify(mask) == kind or (kind == "random" and classify(mask) in ("head", "tail"))


def test_random_position_covers_all_frames_and_single_frame_is_never_masked():
    generator = MaskGenerator(rng=random.Random(2))
    positions = {int(np.flatnonzero(~generator.get_mask(8, "mask_image_random"))[0]) for _ in range(400)}
    assert positions == set(range(8))
    assert generator.get_mask(1, "mask_image_head").all()
    assert generator.get_masks(3, 5).shape == (3, 5)


def test_invalid_ratios_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        MaskGenerator({"mask_no": 0.5})
    with pytest.raises(ValueError, match="unknown mask names"):
        MaskGenerator({"mask_everything": 1.0})
