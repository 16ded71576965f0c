import json

import numpy as np
import pytest

from dataset.bucket import Bucket, BucketBatchSampler, load_bucket_config
from utils.errors import UserError


class Rows:
    """A dataset stand-in: only the meta rows matter to the sampler."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(1, 512, 512), (40, 240, 426), (20, 144, 256), (100, 720, 1280), (17, 256, 256), (1, 1024, 1024)]
    return [dict(zip(("num_frames", "height", "width"), sizes[i])) for i in rng.integers(0, len(sizes), n)]


def test_stage_configs_load_and_assign_as_the_original():
    config = load_bucket_config("configs/buckets/stage1.json")
    bucket = Bucket(config)
    rng = np.random.default_rng(0)
    # A 720p clip of 50 frames: 512 and 1024 hold images only; 240p keeps 32 frames with p=0.3, then 256
    # keeps 48 frames with p=0.5, then 144p takes 32 frames. (A 100-frame clip would pick 64 frames, whose
    # p=0 sends it down to 144p's 96 frames, as in the original.)
    assigned = [bucket.assign(50, 720, 1280, 1, rng) for _ in range(4000)]
    counts = {b: assigned.count(b) / len(assigned) for b in set(assigned)}
    assert set(counts) == {("240p", 32, "0.56"), ("256", 48, "0.57"), ("144p", 32, "0.56")}
    assert counts[("240p", 32, "0.56")] == pytest.approx(0.3, abs=0.03)
    assert counts[("256", 48, "0.57")] == pytest.approx(0.7 * 0.5, abs=0.03)
    assert bucket.assign(100, 720, 1280, 1, rng) == ("144p", 96, "0.56")
    # images never take video buckets
    assert all(b is None or b[1] == 1 for b in (bucket.assign(1, 1024, 1024, 1, rng) for _ in range(50)))
    assert bucket.size(("144p", 16, "1.00")) == (16, 192, 192)
    assert bucket.batch_size(("144p", 16, "1.00")) == 6


def test_sampler_gives_disjoint_uniform_batches_once_per_epoch():
    data = Rows(rows(400))
    config = load_bucket_config("configs/buckets/stage3.json")
    samplers = [BucketBatchSampler(data, config, num_replicas=2, rank=r, seed=3) for r in range(2)]
    per_rank = [list(s) for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1]) == len(samplers[0]) > 0
    seen = [index for batches in per_rank for batch in batches for index, *_ in batch]
    assert len(seen) == len(set(seen))  # every item at most once, no overlap between ranks
    for batches in per_rank:
        for batch in batches:
            assert len({tuple(shape) for _, *shape in batch}) == 1
    again = [list(BucketBatchSampler(data, config, num_replicas=2, rank=0, seed=3))]
    assert again[0] == per_rank[0]  # deterministic per seed and epoch
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]


def test_bad_bucket_configs(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"77p": {"16": [1.0, 2]}}))
    with pytest.raises(UserError, match="unknown resolution"):
        load_bucket_config(str(path))
    path.write_text(json.dumps({"144p": {"16": [1.0, None]}}))
    with pytest.raises(UserError, match="batch size"):
        load_bucket_config(str(path))
