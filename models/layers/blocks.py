"""Building blocks of STDiT2 and STDiT3.

Parameter names and shapes follow Open-Sora v1.1 and v1.2 (`opensora/models/layers/blocks.py`) so that converted
checkpoints load one-to-one. Paddle's `nn.Linear` stores its weight as [in, out], the transpose of PyTorch's;
the converter handles that, nothing here depends on it.
"""

import functools
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer


def approx_gelu():
    return nn.GELU(approximate=True)


# ---------------------------------------------------------------------------------------------- CPU training
#
# Paddle's CPU backward of a broadcast is a sum over the broadcast axes done by a slow single-threaded
# reduction: 10-30 ms for the gradient of an adaLN gate or a bias over a [2, 4096, 192-768] activation, where a
# matmul with a ones vector takes 1-2 ms on both cores. In CPU training (autograd recording on CPU tensors)
# broadcasts are therefore written as matmuls with a ones vector, whose backward is again a matmul, and the layer
# norm and the RMS norm get hand-written backward passes (Paddle's are single-threaded generic kernels). Only
# MKL-backed kernels use more than one thread on Paddle's CPU build: matmuls and equal-shape add, subtract,
# multiply, divide; broadcasting elementwise ops, reductions, softmax, gelu and transposes run on one. The
# forward values are the same (a product with 1.0 is exact). Inference, and any GPU, run the plain ops.


def cpu_autograd(*tensors):
    """True when autograd records an op on these CPU tensors (grad mode on, one of them needs a gradient):
    the one switch for the training-only formulations below."""
    return (
        paddle.is_grad_enabled()
        and any(t is not None and not t.stop_gradient for t in tensors)
        and tensors[0].place.is_cpu_place()
    )


def broadcast_by_matmul(param, shape):
    """`param` broadcast to `shape` as a product with a ones vector, so that its gradient (the sum over the
    broadcast axes) is a matmul too. The axes where param is 1 (or that it lacks in front) must be one
    contiguous run, as for every broadcast in this model; otherwise this is a plain expand."""
    shape = list(shape)
    padded = [1] * (len(shape) - param.ndim) + list(param.shape)
    axes = [axis for axis, (size, target) in enumerate(zip(padded, shape)) if size == 1 and target != 1]
    if not axes or axes[-1] - axes[0] + 1 != len(axes):
        return param.expand(shape)
    before, run, after = (math.prod(part) for part in (shape[: axes[0]], shape[axes[0] : axes[-1] + 1], shape[axes[-1] + 1 :]))
    if after == 1:  # [P, 1] -> [P, R]
        out = paddle.matmul(param.reshape([before, 1]), paddle.ones([1, run], param.dtype))
    else:  # [1, Q] -> [R, Q], or [P, 1, Q] -> [P, R, Q]
        out = paddle.matmul(paddle.ones([run, 1], param.dtype), param.reshape([before, 1, after] if before > 1 else [1, after]))
    return out.reshape(shape)


class _RMSNormalize(PyLayer):
    """x / sqrt(mean(x^2) + eps) over the last axis, with a hand-written backward.

    Paddle's autograd of the plain formula spends most of its time in broadcast gradients over the row
    statistics. One tensor input only: a PyLayer cannot tell which inputs `paddle.grad(outputs, inputs)` asked
    for, and Paddle rejects a gradient returned for one that was not; the weight is applied outside."""

    @staticmethod
    def forward(ctx, x, eps):
        rstd = paddle.rsqrt((x * x).mean(-1, keepdim=True) + eps)
        normed = x * rstd
        ctx.save_for_backward(normed, rstd)
        return normed

    @staticmethod
    def backward(ctx, grad):
        normed, rstd = ctx.saved_tensor()
        # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed)) along the normalised axis
        return (grad - normed * (grad * normed).mean(-1, keepdim=True)) * rstd


def row_mean(x):
    """Mean over the last axis, keeping it, as a matmul (Paddle's CPU mean runs on one thread)."""
    return paddle.matmul(x, paddle.full([x.shape[-1], 1], 1.0 / x.shape[-1], dtype=x.dtype))


class _LayerNormalize(PyLayer):
    """(x - mean) / sqrt(var + eps) over the last axis (Paddle's layer_norm forward), with a backward made of
    matmuls and equal-shape ops: Paddle's CPU layer_norm_grad runs on one thread at 10 ns per element."""

    @staticmethod
    def forward(ctx, x, eps):
        y = F.layer_norm(x, x.shape[-1], epsilon=eps)
        centred = x - row_mean(x).expand(x.shape)
        rstd = paddle.rsqrt(row_mean(centred * centred) + eps)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, rstd = ctx.saved_tensor()
        shape = grad.shape
        # rstd * (g - mean(g) - y * mean(g * y)) along the normalised axis
        centred = grad - row_mean(grad).expand(shape) - y * row_mean(grad * y).expand(shape)
        return centred * rstd.expand(shape)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same forward values) whose bias gradient is a matmul in CPU training."""

    def forward(self, x):
        if self.bias is not None and cpu_autograd(x, self.weight, self.bias):
            out = paddle.matmul(x, self.weight)
            return out + broadcast_by_matmul(self.bias, out.shape)
        return F.linear(x, self.weight, self.bias)


def expand_as(param, x):
    """`param` materialised at x's shape, for elementwise ops against x.

    Paddle's CPU elementwise kernels are slow whenever an operand broadcasts along a leading or middle axis
    (a [B, 1, 1, C] gate times [B, T, S, C] tokens) and fast on equal shapes: for 2 x 4096 x 192 floats,
    `x + gate * y` took 4.3 ms and `x + gate.expand(y.shape) * y` 0.36 ms. On GPUs the expand is one cheap copy.
    In CPU training the broadcast is a matmul, so that its backward is one too (`broadcast_by_matmul`).
    """
    if cpu_autograd(param):
        return broadcast_by_matmul(param, x.shape)
    return param.expand(x.shape)


def t2i_modulate(x, shift, scale):
    return x * expand_as(1 + scale, x) + expand_as(shift, x)


def gated(gate, x):
    """A residual branch x scaled by its adaLN gate."""
    return expand_as(gate, x) * x


def layer_norm_without_affine(hidden_size, eps=1e-6):
    return LayerNormWithoutAffine(hidden_size, eps)


class LayerNormWithoutAffine(nn.Layer):
    """`nn.LayerNorm` without weight and bias (no parameters), with a faster backward in CPU training."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps

    def forward(self, x):
        if cpu_autograd(x):
            return _LayerNormalize.apply(x, self.eps)
        return F.layer_norm(x, self.hidden_size, epsilon=self.eps)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, training=False):
    """Multi-head attention over [B, L, H, D] tensors; `attn_mask` is a bool mask (True = attend)
    broadcastable to [B, H, L_q, L_k].

    On GPUs Paddle's `scaled_dot_product_attention` picks FlashAttention for fp16/bf16 and memory-efficient
    attention for fp32. Elsewhere it falls back to plain math that adds the mask with a broadcast, which
    Paddle's CPU kernels do slowly, so `math_attention` is used instead.
    """
    if uses_fused_attention(query.place):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, training=training
        )
    return math_attention(query, key, value, attn_mask, dropout_p, training)


def uses_fused_attention(place):
    return place.is_gpu_place()


def math_attention(query, key, value, attn_mask=None, dropout_p=0.0, training=False):
    """softmax(q k^T / sqrt(D) + mask) v in fp32-friendly steps; same arguments as `attention`."""
    head_dim = query.shape[-1]
    query = query.transpose([0, 2, 1, 3]) * head_dim**-0.5  # scale the smaller operand, not the scores
    key = key.transpose([0, 2, 1, 3])
    value = value.transpose([0, 2, 1, 3])
    scores = paddle.matmul(query, key, transpose_y=True)  # [B, H, L_q, L_k]
    if attn_mask is not None:
        bias = paddle.where(attn_mask, paddle.zeros([], scores.dtype), paddle.full([], -math.inf, scores.dtype))
        scores = scores + expand_as(bias, scores)
    weights = F.softmax(scores, axis=-1)
    if dropout_p > 0.0 and training:
        weights = F.dropout(weights, dropout_p, training=True)
    return paddle.matmul(weights, value).transpose([0, 2, 1, 3])


class RMSNorm(nn.Layer):
    """RMS normalisation computed in fp32 (the original's `LlamaRMSNorm`, used for qk-norm)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        if hidden_states.dtype == paddle.float32 and cpu_autograd(hidden_states, self.weight):
            normed = _RMSNormalize.apply(hidden_states, self.variance_epsilon)
            return expand_as(self.weight, normed) * normed
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.astype("float32")
        # x * x rather than pow(2): Paddle's CPU pow kernel is an order of magnitude slower.
        variance = (hidden_states * hidden_states).mean(-1, keepdim=True)
        hidden_states = hidden_states * paddle.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.astype(input_dtype)


class Mlp(nn.Layer):
    """Two-layer MLP with the parameter names of timm's `Mlp` (`fc1`, `fc2`)."""

    def __init__(self, in_features, hidden_features, out_features=None, act_layer=approx_gelu):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, out_features or in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Layer):
    """Stochastic depth: drops the whole residual branch of a sample with probability `drop_prob`."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = paddle.bernoulli(paddle.full([x.shape[0]] + [1] * (x.ndim - 1), keep_prob, dtype=x.dtype))
        return x * keep / keep_prob


class RotaryEmbedding(nn.Layer):
    """Rotary position embedding with interleaved pairs, as `rotary_embedding_torch.RotaryEmbedding`.

    `freqs` is a (non-trainable) parameter so that it appears in the state dict as `rope.freqs`, like the
    original checkpoint. Tables are cached per sequence length.
    """

    def __init__(self, dim, theta=10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (paddle.arange(0, dim, 2, dtype="float32")[: dim // 2] / dim))
        self.freqs = self.create_parameter(freqs.shape, default_initializer=nn.initializer.Assign(freqs))
        self.freqs.stop_gradient = True
        self._tables = {}

    def cos_sin(self, seq_len, dtype):
        """Tables (cos [seq_len, 1, dim], sin [seq_len, 1, dim], pair rotation [dim, dim]) for a [B, L, H, D]
        layout, cached per length.

        The cache assumes `freqs` stays fixed, which it does: it is never trained.
        """
        key = (seq_len, str(dtype))
        if key not in self._tables:
            positions = paddle.arange(seq_len, dtype="float32")
            angles = positions[:, None] * self.freqs.astype("float32")[None, :]
            angles = paddle.repeat_interleave(angles, 2, axis=-1)[:, None, :]
            dim = angles.shape[-1]
            # x @ rotation maps each pair (x0, x1) to (-x1, x0).
            rotation = paddle.zeros([dim, dim], dtype="float32")
            rotation[1::2, 0::2] = -paddle.eye(dim // 2)
            rotation[0::2, 1::2] = paddle.eye(dim // 2)
            self._tables[key] = (angles.cos().astype(dtype), angles.sin().astype(dtype), rotation.astype(dtype))
        return self._tables[key]


def apply_rotary(x, cos, sin, rotation):
    """Rotate consecutive pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) along the last axis.

    The pair swap is a matmul with a fixed [D, D] matrix: on the CPU it is several times faster than
    stacking strided slices.
    """
    return x * expand_as(cos, x) + paddle.matmul(x, rotation) * expand_as(sin, x)


class Attention(nn.Layer):
    """Self-attention with optional qk-norm and rotary embedding; input and output [B, N, C].

    With `use_rope`, forward takes the rotary (cos, sin) tables of the sequence length. Open-Sora v1.1 rotates
    queries and keys before their qk-norm; v1.2 (STDiT3) normalises first, which `rope_after_qk_norm` selects.
    """

    def __init__(
        self, dim, num_heads=8, qkv_bias=False, qk_norm=False, use_rope=False, attn_drop=0.0, rope_after_qk_norm=False
    ):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop

        self.qkv = Linear(dim, dim * 3, bias_attr=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)
        self.use_rope = use_rope
        self.rope_after_qk_norm = rope_after_qk_norm

    def forward(self, x, rope_cos_sin=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape([B, N, 3, self.num_heads, self.head_dim])
        q, k, v = qkv.unbind(axis=2)  # [B, N, H, D]
        if self.rope_after_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q = apply_rotary(q, *rope_cos_sin)
            k = apply_rotary(k, *rope_cos_sin)
        if not self.rope_after_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        x = attention(q, k, v, dropout_p=self.attn_drop, training=self.training)
        return self.proj(x.reshape([B, N, C]))


class MultiHeadCrossAttention(nn.Layer):
    """Cross-attention from video tokens [B, N, C] to caption tokens [B, L, C].

    Padded caption tokens are excluded with a per-sample boolean mask [B, 1, 1, L] (True = valid token),
    which gives exactly the original's packed block-diagonal attention without a dense bias.
    """

    def __init__(self, d_model, num_heads, attn_drop=0.0):
        super().__init__()
        assert d_model % num_heads == 0, "d_model must be divisible by num_heads"
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.attn_drop = attn_drop

        self.q_linear = Linear(d_model, d_model)
        self.kv_linear = Linear(d_model, d_model * 2)
        self.proj = Linear(d_model, d_model)

    def project_text(self, cond):
        """Keys and values of the caption tokens, [B, L, H, D] each; they depend on the prompt only."""
        B, L, _ = cond.shape
        kv = self.kv_linear(cond).reshape([B, L, 2, self.num_heads, self.head_dim])
        return kv.unbind(axis=2)

    def forward(self, x, cond, attn_mask=None, text_kv=None):
        B, N, C = x.shape
        q = self.q_linear(x).reshape([B, N, self.num_heads, self.head_dim])
        k, v = text_kv if text_kv is not None else self.project_text(cond)
        x = attention(q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop, training=self.training)
        return self.proj(x.reshape([B, N, C]))


class PatchEmbed3D(nn.Layer):
    """Video to patch tokens: [B, C, T, H, W] -> [B, T'*H'*W', D], zero-padding T, H, W to the patch."""

    def __init__(self, patch_size=(2, 4, 4), in_chans=3, embed_dim=96):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv3D(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        _, _, T, H, W = x.shape
        pad_t, pad_h, pad_w = (-size % patch for size, patch in zip((T, H, W), self.patch_size))
        if pad_t or pad_h or pad_w:
            # Paddle pads NCDHW inputs as [w_left, w_right, h_top, h_bottom, d_front, d_back].
            x = F.pad(x, [0, pad_w, 0, pad_h, 0, pad_t], data_format="NCDHW")
        x = self.proj(x)  # [B, D, T', H', W']
        return x.flatten(2).transpose([0, 2, 1])


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [N, dim] of (possibly fractional) scalars t [N], computed in fp32."""
    half = dim // 2
    freqs = paddle.exp(-math.log(max_period) * paddle.arange(0, half, dtype="float32") / half)
    args = t.astype("float32")[:, None] * freqs[None]
    embedding = paddle.concat([paddle.cos(args), paddle.sin(args)], axis=-1)
    if dim % 2:
        embedding = paddle.concat([embedding, paddle.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


class TimestepEmbedder(nn.Layer):
    """Embeds diffusion timesteps [B] into [B, hidden_size]."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.Silu(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t, dtype):
        t_freq = timestep_embedding(t, self.frequency_embedding_size).astype(dtype)
        return self.mlp(t_freq)


class SizeEmbedder(TimestepEmbedder):
    """Embeds size conditions [B] or [B, K] (height/width, aspect ratio, frames, fps) into [B, K*hidden_size]."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__(hidden_size, frequency_embedding_size)
        self.outdim = hidden_size

    def forward(self, s, batch_size):
        if s.ndim == 1:
            s = s[:, None]
        if s.shape[0] != batch_size:
            s = s.tile([batch_size // s.shape[0], 1])
        num_sizes = s.shape[1]
        s_freq = timestep_embedding(s.flatten(), self.frequency_embedding_size).astype(self.mlp[0].weight.dtype)
        return self.mlp(s_freq).reshape([batch_size, num_sizes * self.outdim])


class CaptionEmbedder(nn.Layer):
    """Projects text-encoder features to the hidden size; in training, replaces whole captions by the learned
    null caption `y_embedding` with probability `uncond_prob` (for classifier-free guidance)."""

    def __init__(self, in_channels, hidden_size, uncond_prob, act_layer=approx_gelu, token_num=120):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size, act_layer=act_layer)
        self.register_buffer("y_embedding", paddle.randn([token_num, in_channels]) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def token_drop(self, caption, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = paddle.rand([caption.shape[0]]) < self.uncond_prob
        else:
            drop_ids = force_drop_ids.astype("bool")
        null_caption = self.y_embedding.astype(caption.dtype)[None, None].expand(caption.shape)
        return paddle.where(drop_ids[:, None, None, None], null_caption, caption)

    def forward(self, caption, train, force_drop_ids=None):
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            if caption.shape[2:] != self.y_embedding.shape:
                raise ValueError(
                    f"caption of shape {caption.shape} cannot be dropped to the null caption of shape "
                    f"{self.y_embedding.shape}: pad captions to model_max_length"
                )
            caption = self.token_drop(caption, force_drop_ids)
        return self.y_proj(caption)


class PositionEmbedding2D(nn.Layer):
    """2-D sin/cos position embedding [1, H*W, dim] of a (resolution-scaled) spatial grid.

    The grid is `arange(n) / scale * base_size / n` per axis, with `scale` a tensor (it comes from the
    height/width conditioning). The angles before the division by `scale` depend only on (h, w, base_size)
    and are cached, so a forward pays one division and a sin/cos, and never reads `scale` back to the host.
    """

    def __init__(self, dim):
        super().__init__()
        assert dim % 4 == 0, "dim must be divisible by 4"
        self.dim = dim
        half_dim = dim // 2
        self.inv_freq = 1.0 / (10000 ** (paddle.arange(0, half_dim, 2, dtype="float32") / half_dim))

    @functools.lru_cache(maxsize=64)
    def _unscaled_angles(self, h, w, base_size):
        grid_h = paddle.arange(h, dtype="float32") * (base_size / h)
        grid_w = paddle.arange(w, dtype="float32") * (base_size / w)
        # Tokens are row-major over (h, w): token i * w + j sits at row i, column j.
        rows = grid_h[:, None].expand([h, w]).flatten()
        cols = grid_w[None, :].expand([h, w]).flatten()
        return cols[:, None] * self.inv_freq[None], rows[:, None] * self.inv_freq[None]

    def forward(self, h, w, scale, base_size, dtype="float32"):
        # As in the original (and MAE), the first half of the channels encodes the column, the second the row.
        angles_col, angles_row = self._unscaled_angles(h, w, base_size)
        angles_col, angles_row = angles_col / scale, angles_row / scale
        emb = paddle.concat([angles_col.sin(), angles_col.cos(), angles_row.sin(), angles_row.cos()], axis=-1)
        return emb.unsqueeze(0).astype(dtype)


class T2IFinalLayer(nn.Layer):
    """PixArt's final layer: adaptive norm then a linear map to patch pixels."""

    def __init__(self, hidden_size, num_patch, out_channels):
        super().__init__()
        self.norm_final = layer_norm_without_affine(hidden_size)
        self.linear = Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = self.create_parameter(
            [2, hidden_size], default_initializer=nn.initializer.Normal(std=hidden_size**-0.5)
        )
        self.out_channels = out_channels

    def forward(self, x, t, x_mask=None, t0=None, T=None, S=None):
        """x [B, T*S, C]; t, t0 [B, C]; x_mask [B, T] bool (True = generated frame)."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, axis=1)
        x = t2i_modulate(self.norm_final(x), shift, scale)
        if x_mask is not None:
            # Kept from the original for checkpoint parity: the conditioning-frame branch normalises the
            # already modulated x again.
            shift_zero, scale_zero = (self.scale_shift_table[None] + t0[:, None]).chunk(2, axis=1)
            x_zero = t2i_modulate(self.norm_final(x), shift_zero, scale_zero)
            x = select_frames(x_mask, x, x_zero, T, S)
        return self.linear(x)


def select_frames(x_mask, x, x_masked, T, S):
    """Per frame: `x` where x_mask [B, T] is True, else `x_masked`; tokens are laid out [B, T*S, C]."""
    B, N, C = x.shape
    x = paddle.where(
        x_mask[:, :, None, None],
        x.reshape([B, T, S, C]),
        x_masked.reshape([B, T, S, C]),
    )
    return x.reshape([B, N, C])
