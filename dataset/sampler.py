"""Batch samplers that give each data-parallel rank disjoint batches, deterministic per seed and epoch.

Without a bucket config every sample has the same size and batches have `batch_size` samples. With one,
samples are grouped by (resolution, frames, aspect ratio) bucket and each batch comes from one bucket, with
that bucket's batch size (see dataset/bucket.py).
"""

import numpy as np
from paddle.io import DistributedBatchSampler


class FixedSizeBatchSampler(DistributedBatchSampler):
    """Shuffled batches of `batch_size` indices per rank; the last incomplete global batch is dropped.

    A subclass of Paddle's DistributedBatchSampler so that the paddlenlp Trainer calls `set_epoch`.
    """

    def __init__(self, dataset, batch_size, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, batch_size=batch_size, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True)
        self.seed = seed

    def global_batches(self):
        order = np.random.default_rng((self.seed, self.epoch)).permutation(len(self.dataset))
        per_step = self.batch_size * self.nranks
        return [order[i : i + per_step] for i in range(0, len(order) - per_step + 1, per_step)]

    def __iter__(self):
        for batch in self.global_batches():
            yield batch[self.local_rank * self.batch_size : (self.local_rank + 1) * self.batch_size].tolist()

    def __len__(self):
        return len(self.dataset) // (self.batch_size * self.nranks)

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def build_batch_sampler(dataset, bucket_config=None, batch_size=1, num_replicas=1, rank=0, seed=0):
    if bucket_config is None:
        return FixedSizeBatchSampler(dataset, batch_size, num_replicas=num_replicas, rank=rank, seed=seed)
    from dataset.bucket import BucketBatchSampler, load_bucket_config

    return BucketBatchSampler(dataset, load_bucket_config(bucket_config), num_replicas=num_replicas, rank=rank, seed=seed)
