"""Mask-strategy edge cases beyond tests/utils/test_inference_utils.py: the exact limits of each rule, the frame
ranges named in errors, and groups of other loops mixed in."""

import numpy as np
import paddle
import pytest

from utils.errors import UserError
from utils.inference_utils import apply_mask_strategy, parse_mask_strategy, validate_mask_strategy


def test_limits_of_the_parsing_rules():
    assert parse_mask_strategy("0,0,0,0,1,1.0")[0].edit_ratio == 1.0  # regenerate completely: allowed
    with pytest.raises(UserError, match='group 2 "-1,0": loop_id and m_id must not be negative'):
        parse_mask_strategy("0;-1,0")
    with pytest.raises(UserError, match='group 1 "0,-1": loop_id and m_id must not be negative'):
        parse_mask_strategy("0,-1")
    with pytest.raises(UserError, match=r'group 1 "0,2": m_id 2 has no reference \(2 given: 0\.\.1\)'):
        parse_mask_strategy("0,2", num_references=2)


def test_validation_names_the_group_and_the_frames():
    groups = parse_mask_strategy("0,0,0,0,4;0,0,1,0,4")
    validate_mask_strategy(groups[:1], reference_lengths=[4], num_frames=4)  # exactly the whole reference and clip
    with pytest.raises(UserError, match=r'^mask_strategy group 2 "0,0,1,0,4,0\.0": frames 1\.\.4 are outside reference 0, which has 4 frame\(s\)$'):
        validate_mask_strategy(groups, reference_lengths=[4], num_frames=4)
    with pytest.raises(UserError, match=r'^mask_strategy group 1 "0,0,0,-2,3,0\.0": target frames 2\.\.4 do not fit in --num-frames 4$'):
        validate_mask_strategy(parse_mask_strategy("0,0,0,-2,3"), reference_lengths=[4], num_frames=4)
    with pytest.raises(UserError, match=r"frames -1\.\.0 are outside reference 0"):
        validate_mask_strategy(parse_mask_strategy("0,0,-5,0,2"), reference_lengths=[4], num_frames=4)
    validate_mask_strategy(parse_mask_strategy("0,0,-4,0,1"), reference_lengths=[4], num_frames=4)  # first frame, from the end


def test_groups_of_other_loops_are_skipped_not_stopping_at_them():
    z = paddle.zeros([2, 3, 4, 1, 1])  # batch 2, 3 channels: the mask is [batch, frames]
    references = [[], [paddle.full([3, 2, 1, 1], 7.0)]]
    masks = apply_mask_strategy(z, references, [None, "1,0,0,0,1;0,0,1,2,1,0.5"], loop_i=0)
    np.testing.assert_array_equal(masks.numpy(), [[1, 1, 1, 1], [1, 1, 0.5, 1]])
    assert masks.dtype == paddle.float32
    np.testing.assert_array_equal(z.numpy()[1, :, :, 0, 0], [[0, 0, 7, 0]] * 3)
