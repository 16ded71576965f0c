"""STDiT3: the spatial-temporal diffusion transformer of Open-Sora v1.2, in Paddle.

Parameter names, shapes and numerics follow the original `STDiT3` so that the official
`hpcai-tech/OpenSora-STDiT-v3` weights load after `scripts/convert_checkpoint.py stdit3`.

Where STDiT2 packs spatial and temporal attention into one block, STDiT3 alternates two kinds of full
blocks, each with its own adaLN table, cross-attention and MLP: a spatial block attends within each frame,
a temporal block across frames at one position (with rotary embedding, applied after qk-norm). The
timestep embedding carries the frame rate; height and width only scale the spatial position embedding
(no size, aspect-ratio or length embedders as in v1.1). As in STDiT2, conditioning frames (x_mask False)
are modulated with the timestep-0 embedding.
"""

import dataclasses
import os

import numpy as np
import paddle
import paddle.nn as nn
from paddle.distributed.fleet.utils import recompute

from models.layers.blocks import (
    Attention,
    CaptionEmbedder,
    DropPath,
    Mlp,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    PositionEmbedding2D,
    RotaryEmbedding,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
    approx_gelu,
    expand_as,
    gated,
    layer_norm_without_affine,
    t2i_modulate,
)
from models.stdit.attention_cache import AttentionCacheMixin, cached_attention
from models.stdit.stdit2 import CONFIG_NAME, WEIGHTS_NAME, CaptionContext, ModelConfigMixin, STDiT2, modulation
from utils.errors import UserError
from utils.io import read_json_object


@dataclasses.dataclass
class STDiT3Config(ModelConfigMixin):
    """Constructor arguments of `STDiT3`, saved as `config.json` next to the weights.

    The defaults are the original's (`STDiT3Config` of Open-Sora v1.2). Three fields exist so that the
    original's configs load and round-trip, and change nothing here: `enable_flash_attn` (attention picks its
    kernel from device and dtype), `enable_layernorm_kernel` (apex's fused LayerNorm; Paddle's LayerNorm is
    one kernel with the same numerics) and `enable_sequence_parallelism` (splits the tokens of a sample over
    GPUs, with the same result as one device; this port runs a sample on one device).

    `skip_y_embedder`: captions arrive already projected by `y_embedder` ([B, 1, L, hidden_size] features
    extracted once for training), so the projection and the caption dropout are skipped.
    """

    model_name = "STDiT3"
    converter = "stdit3"

    model_type: str = "STDiT3"  # written to config.json: which model the directory holds
    input_sq_size: int = 512
    in_channels: int = 4
    patch_size: tuple = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.model_type != self.model_name:
            raise UserError(f"STDiT3 config: model_type {self.model_type!r} must be 'STDiT3'")
        self.patch_size = tuple(self.patch_size)
        if len(self.patch_size) != 3:
            raise UserError(f"STDiT3 config: patch_size {list(self.patch_size)} must have 3 entries (T, H, W)")
        if self.hidden_size % 4 or self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise UserError(
                f"STDiT3 config: hidden_size {self.hidden_size} must be divisible by 4 (2-D position embedding) "
                f"and by num_heads {self.num_heads} into an even head dimension (rotary embedding)"
            )


class STDiT3Block(nn.Layer):
    """adaLN self-attention (spatial: within a frame; temporal: across frames), cross-attention to the
    caption, then an adaLN MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, drop_path=0.0, qk_norm=False, temporal=False):
        super().__init__()
        self.temporal = temporal
        self.norm1 = layer_norm_without_affine(hidden_size)
        self.attn = Attention(
            hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, use_rope=temporal, rope_after_qk_norm=True
        )
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)
        self.norm2 = layer_norm_without_affine(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=approx_gelu)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.scale_shift_table = self.create_parameter(
            [6, hidden_size], default_initializer=nn.initializer.Normal(std=hidden_size**-0.5)
        )

    def forward(self, x, y, t_mlp, text_mask, x_mask, t0_mlp, T, S, rope_cos_sin=None, text_kv=None,
                attention_cache=None):
        """x [B, T*S, C]; y [B, L, C]; t_mlp, t0_mlp [B, 6C]; text_mask [B, 1, 1, L] bool; x_mask [B, T] bool;
        rope_cos_sin: rotary tables of length T (read by temporal blocks only); text_kv: this block's
        precomputed caption keys and values (then y is not used); attention_cache: this block's
        `BlockAttentionCache` when sampling reuses attention outputs (see attention_cache.py)."""
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(
            self.scale_shift_table, t_mlp, t0_mlp, x_mask
        )
        x = x.reshape([B, T, S, C])

        kind = "temporal" if self.temporal else "spatial"
        x_a = cached_attention(attention_cache, kind, self.self_attention, x, shift_msa, scale_msa, rope_cos_sin)
        x = x + self.drop_path(gated(gate_msa, x_a))

        # cross attention to the caption (not modulated, as in PixArt)
        x_c = cached_attention(attention_cache, "cross", self.cross_attn, x.reshape([B, N, C]), y, text_mask, text_kv)
        x = x + x_c.reshape([B, T, S, C])

        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = x + self.drop_path(gated(gate_mlp, self.mlp(x_m)))
        return x.reshape([B, N, C])

    def self_attention(self, x, shift, scale, rope_cos_sin):
        """Attention of the modulated tokens x [B, T, S, C] within each frame (spatial block) or across frames
        at each position (temporal block); returns [B, T, S, C]."""
        B, T, S, C = x.shape
        x_m = t2i_modulate(self.norm1(x), shift, scale)
        if self.temporal:
            x_m = x_m.transpose([0, 2, 1, 3]).reshape([B * S, T, C])
            return self.attn(x_m, rope_cos_sin).reshape([B, S, T, C]).transpose([0, 2, 1, 3])
        return self.attn(x_m.reshape([B * T, S, C])).reshape([B, T, S, C])


class STDiT3(AttentionCacheMixin, nn.Layer):
    def __init__(self, config: STDiT3Config):
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.pred_sigma else config.in_channels
        self.hidden_size = config.hidden_size
        self.patch_size = config.patch_size
        self.input_sq_size = config.input_sq_size
        self.gradient_checkpointing = config.gradient_checkpointing

        self.pos_embed = PositionEmbedding2D(config.hidden_size)
        self.rope = RotaryEmbedding(config.hidden_size // config.num_heads)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.fps_embedder = SizeEmbedder(config.hidden_size)
        self.t_block = nn.Sequential(nn.Silu(), nn.Linear(config.hidden_size, 6 * config.hidden_size))
        self.y_embedder = CaptionEmbedder(
            in_channels=config.caption_channels,
            hidden_size=config.hidden_size,
            uncond_prob=config.class_dropout_prob,
            act_layer=approx_gelu,
            token_num=config.model_max_length,
        )

        drop_path_rates = np.linspace(0, config.drop_path, config.depth)

        def stack(temporal):
            return nn.LayerList(
                [
                    STDiT3Block(
                        config.hidden_size,
                        config.num_heads,
                        mlp_ratio=config.mlp_ratio,
                        drop_path=float(rate),
                        qk_norm=config.qk_norm,
                        temporal=temporal,
                    )
                    for rate in drop_path_rates
                ]
            )

        self.spatial_blocks = stack(temporal=False)
        self.temporal_blocks = stack(temporal=True)
        self.final_layer = T2IFinalLayer(config.hidden_size, int(np.prod(self.patch_size)), self.out_channels)

        self.initialize_weights()
        self.apply_freeze()

    # ------------------------------------------------------------------ initialisation and freezing

    def initialize_weights(self):
        """The original's initialisation. Unlike STDiT2's, the timestep and caption embedders keep the xavier
        initialisation of every linear layer, the final layer is not zeroed, and only the temporal blocks start
        with zero output projections."""
        xavier_uniform = nn.initializer.XavierUniform()
        zeros = nn.initializer.Constant(0.0)
        for layer in self.sublayers():
            if isinstance(layer, nn.Linear):
                xavier_uniform(layer.weight)
                if layer.bias is not None:
                    zeros(layer.bias)

        # PyTorch's default for a convolution: weight and bias uniform in +-1/sqrt(fan_in).
        proj = self.x_embedder.proj
        bound = 1.0 / int(np.prod(proj.weight.shape[1:])) ** 0.5
        nn.initializer.Uniform(-bound, bound)(proj.weight)
        nn.initializer.Uniform(-bound, bound)(proj.bias)

        # The fps embedding starts at zero, so it adds nothing to the timestep embedding at first.
        nn.initializer.Normal(std=0.02)(self.fps_embedder.mlp[0].weight)
        zeros(self.fps_embedder.mlp[2].weight)
        zeros(self.fps_embedder.mlp[2].bias)

        # A new temporal block starts as the identity: its branches end in zero projections.
        for block in self.temporal_blocks:
            for linear in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                zeros(linear.weight)

    def apply_freeze(self):
        """`only_train_temporal` trains the temporal blocks alone; `freeze_y_embedder` fixes the caption projection."""
        for name, param in self.named_parameters():
            if self.config.only_train_temporal and not name.startswith("temporal_blocks."):
                param.stop_gradient = True
            if self.config.freeze_y_embedder and name.startswith("y_embedder."):
                param.stop_gradient = True

    # ------------------------------------------------------------------ forward

    # Same patch layout, output layout and file format as STDiT2.
    get_dynamic_size = STDiT2.get_dynamic_size
    unpatchify = STDiT2.unpatchify
    save_pretrained = STDiT2.save_pretrained
    load_weights = STDiT2.load_weights

    def blocks_in_order(self):
        """Blocks in the order forward runs them: spatial 0, temporal 0, spatial 1, ..."""
        return [block for pair in zip(self.spatial_blocks, self.temporal_blocks) for block in pair]

    def forward(
        self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None, num_frames=None, ar=None
    ):
        """Predict the rectified-flow velocity of a batch of video latents. With `pred_sigma` the output has a
        second half of channels, as in the original, which rectified-flow sampling and training ignore.

        Args:
            x: latents [B, C, T, H, W].
            timestep: diffusion timesteps [B].
            y: caption features [B, 1, L, C_text] (a batch that is a multiple of `mask`'s repeats the mask), or
                a `CaptionContext` from `encode_caption` (then `mask` is ignored). With `skip_y_embedder`,
                C_text is hidden_size: the features have already been through `y_embedder`.
            mask: valid caption tokens [B, L] (1 = token, 0 = padding); None = all tokens valid.
            x_mask: [B, T] bool, True = frame to generate, False = conditioning frame (timestep-0 modulation).
            fps: frame rate [B], embedded into the timestep.
            height, width: pixel size [B]; the first sample's sqrt(height * width) / input_sq_size scales the
                spatial position embedding.
            num_frames, ar: accepted and unused, so that callers can pass STDiT2's conditioning unchanged.

        Returns:
            [B, out_channels, T, H, W] float32 with out_channels = 2 * C if `pred_sigma` else C.
        """
        B = x.shape[0]
        dtype = self.x_embedder.proj.weight.dtype
        x = x.astype(dtype)
        timestep = timestep.astype(dtype)

        # patch tokens plus the resolution-aware spatial position embedding
        _, _, Tx, Hx, Wx = x.shape
        T, H, W = self.get_dynamic_size(x)
        S = H * W
        # The original takes the resolution of the first sample; all samples of a batch share a bucket.
        resolution = paddle.sqrt(height[0].astype("float32") * width[0].astype("float32"))
        pos_emb = self.pos_embed(H, W, scale=resolution / self.input_sq_size, base_size=round(S**0.5), dtype=dtype)
        x = self.x_embedder(x).reshape([B, T, S, self.hidden_size])
        x = (x + expand_as(pos_emb[:, None], x)).reshape([B, T * S, self.hidden_size])

        # adaLN inputs, once per forward and shared by all blocks: timestep plus frame rate
        fps_emb = self.fps_embedder(fps.astype(dtype)[:, None], B)
        t = self.t_embedder(timestep, dtype=dtype) + fps_emb
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if x_mask is not None:
            x_mask = x_mask.astype("bool")
            t0 = self.t_embedder(paddle.zeros_like(timestep), dtype=dtype) + fps_emb
            t0_mlp = self.t_block(t0)

        blocks = self.blocks_in_order()
        if isinstance(y, CaptionContext):
            caption, text_mask, keys_values = None, y.text_mask, y.keys_values
        else:
            caption, text_mask = self.embed_caption(y, mask)
            keys_values = [None] * len(blocks)

        block_caches = [None] * len(blocks)
        if self.attention_cache is not None and not self.training:
            block_caches = self.attention_cache.begin_step(timestep, (B, T, S), len(blocks))

        rope_cos_sin = self.rope.cos_sin(T, dtype)
        for block, text_kv, block_cache in zip(blocks, keys_values, block_caches):
            args = (x, caption, t_mlp, text_mask, x_mask, t0_mlp, T, S, rope_cos_sin, text_kv)
            if self.gradient_checkpointing and self.training:
                x = recompute(block, *args)
            else:
                x = block(*args, attention_cache=block_cache)

        x = self.final_layer(x, t, x_mask, t0, T, S)
        x = self.unpatchify(x, T, H, W, Tx, Hx, Wx)
        return x.astype("float32")

    def embed_caption(self, y, mask=None):
        """Caption tokens [B, L, C] after the caption embedder (with training-time dropout; skipped with
        `skip_y_embedder`) and the padding mask [B, 1, 1, L] (None when all tokens are valid). A mask of a
        smaller batch is repeated."""
        y = y.astype(self.x_embedder.proj.weight.dtype)
        if not self.config.skip_y_embedder:
            y = self.y_embedder(y, self.training)
        y = y.squeeze(1)
        if mask is None:
            return y, None
        mask = mask.reshape([mask.shape[0], -1])
        if mask.shape[0] != y.shape[0]:
            mask = mask.tile([y.shape[0] // mask.shape[0], 1])
        return y, mask.astype("bool")[:, None, None, :]

    @paddle.no_grad()
    def encode_caption(self, y, mask=None):
        """Precompute the caption side of every cross-attention for inference (see `CaptionContext`)."""
        if self.training:
            raise RuntimeError("encode_caption is for inference; call model.eval() first")
        caption, text_mask = self.embed_caption(y, mask)
        keys_values = [block.cross_attn.project_text(caption) for block in self.blocks_in_order()]
        return CaptionContext(keys_values=keys_values, text_mask=text_mask)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_path, dtype=None, **config_overrides):
        """Build the model from `config.json` in `pretrained_path` and load `model.safetensors`.

        `config_overrides` replace config fields that do not change the weights (gradient_checkpointing,
        only_train_temporal, freeze_y_embedder).
        """
        config = dataclasses.replace(STDiT3Config.from_pretrained(pretrained_path), **config_overrides)
        model = cls(config)
        model.load_weights(os.path.join(pretrained_path, WEIGHTS_NAME))
        if dtype is not None:
            model.to(dtype=dtype)
        return model


def count_parameters(config: STDiT3Config):
    """Number of parameters of an STDiT3 with this config, built lazily (no weights are allocated)."""
    with paddle.LazyGuard():
        model = STDiT3(config)
    return sum(int(np.prod(param.shape)) for param in model.parameters())
