"""A training-free attention cache for STDiT2 and STDiT3 sampling, after Pyramid Attention Broadcast (PAB;
Zhao et al., "Real-Time Video Generation with Pyramid Attention Broadcast", 2024).

In the middle of a sampling schedule a block's attention outputs change little from one step to the next;
at the start (the layout is being decided) and at the end (fine detail) they change fast. So inside a range
of timesteps the cache computes each kind of attention once every `interval` steps and, at the steps in
between, broadcasts (reuses) the output it stored. The kinds are not equally stable: cross attention to the
caption changes least, hence a pyramid of intervals in which it is reused longest (PAB also found spatial
attention less stable than temporal; on the shipped model the two change alike, see the presets).

Only the attention layer's output is reused (for spatial and temporal attention together with the adaLN
norm in front of it). The gate, the residual sum and the MLP run at the current step, so a reused output is
still weighted by the current timestep's modulation.

    transformer.enable_attention_cache("balanced")  # a preset name or an AttentionCacheConfig
    ...                                              # sample as usual
    transformer.disable_attention_cache()

or `with transformer.attention_cache_enabled("balanced"): ...` (None leaves the model as it is).

A sampling run is seen by the model as forwards with decreasing timesteps. Whenever the timestep does not
decrease, or the batch or token grid changes, the cache drops what it stored and the step computes
everything: each generation, each loop of a long video and each draw of several videos starts with a full
step. With classifier-free guidance the conditional and unconditional halves go through the model as one
doubled batch, and the cache holds that doubled batch.

Memory: one stored tensor per block and cached kind, as large as the block's tokens ([B, T*S, C]).
"""

import collections
import contextlib
import dataclasses
import numbers

from utils.errors import UserError

ATTENTION_KINDS = ("spatial", "temporal", "cross")


@dataclasses.dataclass(frozen=True)
class Broadcast:
    """When one kind of attention is reused: at timesteps strictly between `timesteps[0]` and `timesteps[1]`
    (the samplers' scale, 1000 = pure noise, 0 = data) it is computed once every `interval` steps and its
    last output reused at the others; outside that range it is computed at every step. `interval` 1 never
    reuses."""

    timesteps: tuple
    interval: int


@dataclasses.dataclass(frozen=True)
class AttentionCacheConfig:
    """Per kind of attention, its `Broadcast`, or None to compute it at every step."""

    spatial: Broadcast = None
    temporal: Broadcast = None
    cross: Broadcast = None

    def __post_init__(self):
        for kind in ATTENTION_KINDS:
            broadcast = getattr(self, kind)
            if broadcast is None:
                continue
            if not isinstance(broadcast, Broadcast):
                raise UserError(f"attention cache: {kind} is {broadcast!r}; give a Broadcast(timesteps, interval) or None")
            interval = broadcast.interval
            if not isinstance(interval, numbers.Integral) or isinstance(interval, bool) or interval < 1:
                raise UserError(
                    f"attention cache: {kind} interval {interval!r} must be a whole number >= 1 "
                    "(compute once every `interval` steps; 1 computes every step)"
                )
            timesteps = broadcast.timesteps
            if (
                not isinstance(timesteps, (tuple, list))
                or len(timesteps) != 2
                or not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in timesteps)
                or not timesteps[0] < timesteps[1]
            ):
                raise UserError(
                    f"attention cache: {kind} timesteps {timesteps!r} must be two numbers (low, high) with low < high, "
                    "on the samplers' scale (1000 = pure noise, 0 = data)"
                )

    def broadcasts(self):
        """{kind: Broadcast} of the kinds that are ever reused."""
        return {kind: getattr(self, kind) for kind in ATTENTION_KINDS if getattr(self, kind) is not None}


# Chosen on the shipped model (benchmarks/bench_attention_cache.py; figures in results/bench_attention_cache.json).
# Its attention outputs change most over the first steps (t > 920: 13-40% from one step to the next, in
# relative norm), least in the middle (t 300-800: 5-7%) and more again at the end (t < 200: 6-16%); cross
# attention changes about half as much as the others, spatial and temporal attention alike. So the ranges
# leave out the first steps, cross attention is reused twice as long, and spatial and temporal attention
# share one interval: refreshed at the same steps they kept more fidelity than PAB's staggered 2/4/6.
ATTENTION_CACHE_PRESETS = {
    "quality": AttentionCacheConfig(
        spatial=Broadcast(timesteps=(200, 950), interval=2),
        temporal=Broadcast(timesteps=(200, 950), interval=2),
        cross=Broadcast(timesteps=(200, 950), interval=4),
    ),
    "balanced": AttentionCacheConfig(
        spatial=Broadcast(timesteps=(150, 960), interval=4),
        temporal=Broadcast(timesteps=(150, 960), interval=4),
        cross=Broadcast(timesteps=(150, 960), interval=8),
    ),
    # Reaches further into the first steps, where the clip's motion is decided: it costs direction accuracy.
    "fast": AttentionCacheConfig(
        spatial=Broadcast(timesteps=(100, 970), interval=5),
        temporal=Broadcast(timesteps=(100, 970), interval=5),
        cross=Broadcast(timesteps=(100, 970), interval=10),
    ),
}


def attention_cache_config(config):
    """An `AttentionCacheConfig` from itself or from the name of a preset."""
    if isinstance(config, AttentionCacheConfig):
        return config
    if isinstance(config, str) and config in ATTENTION_CACHE_PRESETS:
        return ATTENTION_CACHE_PRESETS[config]
    raise UserError(
        f"attention cache {config!r}: not a preset ({', '.join(ATTENTION_CACHE_PRESETS)}) or an AttentionCacheConfig"
    )


class AttentionCache:
    """The attention outputs one model stored, keyed by (block index, kind), and the decision, made once per
    forward, of which kinds the current step reuses.

    `computed` and `reused` count attention evaluations and reuses per kind over the cache's life (summed over
    blocks); `runs` counts the sampling runs it has seen.
    """

    def __init__(self, config):
        self.config = attention_cache_config(config)
        self.cached_kinds = frozenset(self.config.broadcasts())
        self.computed = collections.Counter()
        self.reused = collections.Counter()
        self.runs = 0
        self.reset()

    def reset(self):
        """Forget every stored output: the next forward computes everything and starts a new run."""
        self.outputs = {}
        self.layout = None
        self.previous_timestep = None
        self.steps_since_computed = dict.fromkeys(ATTENTION_KINDS, 0)
        self.reused_kinds = frozenset()

    def begin_step(self, timestep, layout, num_blocks):
        """Decide which kinds this forward reuses; returns one `BlockAttentionCache` per block.

        timestep: [B] tensor of the step; layout: (batch, frames, tokens per frame) of the forward.
        Skipping work is a decision the host makes, so the timestep is read back here, once per forward and
        only with the cache on (a copy of B numbers on a CPU; on a GPU it waits for the tensor the sampler
        has just built).
        """
        t = float(timestep.numpy().max())
        # Samplers walk the timesteps downwards, so a timestep that does not decrease is the first step of
        # another run (a new generation, the next loop or draw); so is a step of another batch or token grid.
        if self.previous_timestep is None or t >= self.previous_timestep or layout != self.layout:
            self.reset()
            self.layout = layout
            self.runs += 1
        first_step = self.previous_timestep is None
        self.previous_timestep = t

        # Inside its range a kind is computed when `interval` steps have passed since it last was: the steps
        # between reuse it. Entering the range reuses the output of the last step before it.
        reused = set()
        for kind, broadcast in self.config.broadcasts().items():
            low, high = broadcast.timesteps
            if not first_step and low < t < high and self.steps_since_computed[kind] + 1 < broadcast.interval:
                reused.add(kind)
                self.steps_since_computed[kind] += 1
            else:
                self.steps_since_computed[kind] = 0
        self.reused_kinds = frozenset(reused)
        return [BlockAttentionCache(self, index) for index in range(num_blocks)]

    def attend(self, block_index, kind, compute, *args):
        """This block's stored output of `kind` if the step reuses it, else `compute(*args)`, stored when the
        config ever reuses that kind."""
        key = (block_index, kind)
        if kind in self.reused_kinds and key in self.outputs:
            self.reused[kind] += 1
            return self.outputs[key]
        output = compute(*args)
        self.computed[kind] += 1
        if kind in self.cached_kinds:
            self.outputs[key] = output
        return output


@dataclasses.dataclass
class BlockAttentionCache:
    """One block's part of an `AttentionCache`: what the block stores goes under its own index."""

    cache: AttentionCache
    block_index: int


def cached_attention(block_cache, kind, compute, *args):
    """`compute(*args)`, or the output of `kind` this block stored, when the cache reuses it at this step.
    Without a cache (`block_cache` None, the default) this is exactly `compute(*args)`."""
    if block_cache is None:
        return compute(*args)
    return block_cache.cache.attend(block_cache.block_index, kind, compute, *args)


class AttentionCacheMixin:
    """`enable_attention_cache` and friends for a model whose forward asks `self.attention_cache` which
    attention outputs to reuse (see `AttentionCache.begin_step`). The cache acts in eval mode only: in
    training every step computes everything, as gradients need."""

    attention_cache = None

    def enable_attention_cache(self, config):
        """Reuse attention outputs across sampling steps as `config` (an `AttentionCacheConfig` or a preset
        name: "quality", "balanced", "fast") says. Returns the `AttentionCache`, whose counters tell what
        was reused."""
        self.attention_cache = AttentionCache(config)
        return self.attention_cache

    def disable_attention_cache(self):
        """Back to computing every attention at every step; stored outputs are freed."""
        self.attention_cache = None

    @contextlib.contextmanager
    def attention_cache_enabled(self, config):
        """`enable_attention_cache(config)` for the `with` block, then the model's previous cache (usually
        none). `config` None leaves the model as it is, so a caller can pass an optional setting through."""
        previous = self.attention_cache
        if config is not None:
            self.enable_attention_cache(config)
        try:
            yield self.attention_cache
        finally:
            self.attention_cache = previous
