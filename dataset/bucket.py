"""Multi-resolution, variable-length buckets (Open-Sora v1.1) and the batch sampler that draws from them.

A bucket config is a JSON object `{resolution: {num_frames: [keep_prob, batch_size]}}` with resolutions
from utils/aspect.py, e.g. configs/buckets/stage1.json. A clip goes to the largest resolution it covers
(at least 80% of its pixels) and, within it, to the longest frame count it has more frames than (times the
frame interval), if a random draw keeps it there with `keep_prob`; otherwise it tries the next resolution
down. Its aspect ratio picks the closest (height, width) of that resolution's table.
"""

import json
import os

import numpy as np
from paddle.io import DistributedBatchSampler

from utils.aspect import ASPECT_RATIOS, get_closest_ratio
from utils.errors import UserError

RESOLUTION_COVERAGE = 0.8


def load_bucket_config(path):
    if not os.path.isfile(path):
        raise UserError(f"--bucket_config {path}: file not found; see configs/buckets/")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as error:
        raise UserError(f"--bucket_config {path}: not valid JSON ({error})") from None
    config = {}
    for resolution, lengths in raw.items():
        if resolution not in ASPECT_RATIOS:
            raise UserError(f"--bucket_config {path}: unknown resolution {resolution!r}; use one of {sorted(ASPECT_RATIOS)}")
        config[resolution] = {}
        for num_frames, (keep_prob, batch_size) in lengths.items():
            if keep_prob > 0 and (not isinstance(batch_size, int) or batch_size < 1):
                raise UserError(f"--bucket_config {path}: {resolution}/{num_frames} keeps clips but has batch size {batch_size}")
            config[resolution][int(num_frames)] = (float(keep_prob), batch_size)
    return config


class Bucket:
    def __init__(self, bucket_config):
        # Largest resolution first, longest clips first, as the assignment tries them in this order.
        self.resolutions = sorted(bucket_config, key=lambda name: ASPECT_RATIOS[name][0], reverse=True)
        self.config = {name: dict(sorted(bucket_config[name].items(), reverse=True)) for name in self.resolutions}

    def assign(self, num_frames, height, width, frame_interval=1, rng=None):
        """(resolution, frames, aspect-ratio key) for a clip, or None when no bucket keeps it."""
        rng = rng or np.random.default_rng()
        for resolution in self.resolutions:
            pixels, table = ASPECT_RATIOS[resolution]
            if height * width < pixels * RESOLUTION_COVERAGE:
                continue
            lengths = self.config[resolution]
            if num_frames == 1:
                candidates = [1] if 1 in lengths else []
            else:
                candidates = [t for t in lengths if t != 1 and num_frames > t * frame_interval][:1]
            if not candidates:
                continue
            keep_prob, _ = lengths[candidates[0]]
            if keep_prob >= 1 or rng.random() < keep_prob:
                return resolution, candidates[0], get_closest_ratio(height, width, table)
        return None

    def size(self, bucket):
        """(frames, height, width) of a bucket."""
        resolution, num_frames, ratio = bucket
        height, width = ASPECT_RATIOS[resolution][1][ratio]
        return num_frames, height, width

    def batch_size(self, bucket):
        return self.config[bucket[0]][bucket[1]][1]


class BucketBatchSampler(DistributedBatchSampler):
    """Batches of one bucket each, as `(index, frames, height, width)` tuples; each rank gets disjoint
    batches, deterministic per seed and epoch. Buckets' incomplete last batches are dropped."""

    def __init__(self, dataset, bucket_config, num_replicas=1, rank=0, seed=0, frame_interval=None):
        super().__init__(dataset, batch_size=1, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True)
        self.bucket = Bucket(bucket_config)
        self.seed = seed
        self.frame_interval = frame_interval or getattr(dataset, "frame_interval", 1)

    def epoch_batches(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        members = {}
        for index, row in enumerate(self.dataset.rows):
            bucket = self.bucket.assign(row["num_frames"], row["height"], row["width"], self.frame_interval, rng)
            if bucket is not None:
                members.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(members):
            indices = rng.permutation(members[bucket])
            size = self.bucket.batch_size(bucket)
            shape = self.bucket.size(bucket)
            for start in range(0, len(indices) - size + 1, size):
                batches.append([(int(i), *shape) for i in indices[start : start + size]])
        order = rng.permutation(len(batches))
        usable = len(order) - len(order) % self.nranks  # every rank takes the same number of steps
        return [batches[i] for i in order[:usable]]

    def __iter__(self):
        yield from self.epoch_batches()[self.local_rank :: self.nranks]

    def __len__(self):
        return len(self.epoch_batches()) // self.nranks

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
