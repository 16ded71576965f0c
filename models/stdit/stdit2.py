"""STDiT2: the spatial-temporal diffusion transformer of Open-Sora v1.1, in Paddle.

Parameter names, shapes and numerics follow the original `STDiT2` so that official checkpoints load after
`scripts/convert_checkpoint.py stdit2`. Each block attends spatially within a frame, temporally across
frames at one position (with rotary embedding), then cross-attends to the caption.

Conditioning frames (x_mask False) are modulated with the timestep-0 embedding, so a model can be told
which frames are given (image-to-video, extension, editing) and which it must generate.
"""

import dataclasses
import json
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
from utils.errors import UserError
from utils.io import atomic_path, read_json_object, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FREEZE_OPTIONS = (None, "not_temporal", "text")


@dataclasses.dataclass
class CaptionContext:
    """Caption features prepared once per generation by `STDiT2.encode_caption`.

    The cross-attention keys and values depend on the prompt only, so a sampler computes them once and
    passes this object as `y` at every step instead of re-projecting the caption in every block.
    """

    keys_values: list  # per block: (keys, values), each [B, L, heads, head_dim]
    text_mask: paddle.Tensor  # [B, 1, 1, L] bool, or None when every token is valid


class ModelConfigMixin:
    """Reading an STDiT config: unknown keys refused with advice, and a model directory checked before its
    weights load. Subclasses name their model (`model_name`) and the converter subcommand (`converter`)."""

    model_name = "STDiT"
    converter = "stdit2"

    @classmethod
    def from_dict(cls, values, source="config", advice=None):
        """`advice` ends the unknown-keys error; by default it points at the converter."""
        model_type = values.get("model_type", cls.model_name)
        if model_type != cls.model_name and model_type in ("STDiT2", "STDiT3"):
            raise UserError(f"{source}: an {model_type} config, not an {cls.model_name} one; load it with {model_type} "
                            "(models.families.load_transformer picks the class from the config)")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            advice = advice or (
                f"is this an {cls.model_name} config? Official Open-Sora checkpoints must be converted first with "
                f"scripts/convert_checkpoint.py {cls.converter}"
            )
            raise UserError(f"{source}: unknown {cls.model_name} config keys {unknown[:5]}; {advice}")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path):
        return cls.from_dict(read_json_object(path, f"{cls.model_name} config (e.g. configs/{cls.converter}/tiny.json)"),
                             source=path)

    @classmethod
    def from_pretrained(cls, pretrained_path):
        """The config of a model directory (save_pretrained / convert_checkpoint.py output), without its weights."""
        if not os.path.isdir(pretrained_path):
            raise UserError(
                f"{pretrained_path}: {cls.model_name} model directory not found; give a directory written by "
                f"save_pretrained or by scripts/convert_checkpoint.py {cls.converter}"
            )
        config_path = os.path.join(pretrained_path, CONFIG_NAME)
        if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(pretrained_path, WEIGHTS_NAME)):
            raise UserError(
                f"{pretrained_path}: not an {cls.model_name} directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                f"convert official checkpoints with scripts/convert_checkpoint.py {cls.converter}"
            )
        return cls.from_json_file(config_path)

    def to_dict(self):
        values = dataclasses.asdict(self)
        values["patch_size"] = list(self.patch_size)
        return values


@dataclasses.dataclass
class STDiT2Config(ModelConfigMixin):
    """Constructor arguments of `STDiT2`, saved as `config.json` next to the weights.

    Three fields exist so that the original's configs load and round-trip, and change nothing here:
    `enable_flash_attn` (attention picks its kernel from device and dtype: FlashAttention through
    `scaled_dot_product_attention` for fp16/bf16 on GPUs, matmul-softmax on CPUs), `enable_layernorm_kernel`
    (the original's switch to apex's fused LayerNorm; Paddle's LayerNorm is already one kernel, with the same
    numerics) and `no_temporal_pos_emb` (the original STDiT2 stores it but never reads it: its temporal
    positions are rotary).
    """

    model_name = "STDiT2"
    converter = "stdit2"

    model_type: str = "STDiT2"  # written to config.json: which model the directory holds
    input_sq_size: int = 32
    in_channels: int = 4
    patch_size: tuple = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    no_temporal_pos_emb: bool = False
    caption_channels: int = 4096
    model_max_length: int = 120
    freeze: str = None
    qk_norm: bool = False
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.model_type != self.model_name:
            raise UserError(f"STDiT2 config: model_type {self.model_type!r} must be 'STDiT2'")
        self.patch_size = tuple(self.patch_size)
        if len(self.patch_size) != 3:
            raise UserError(f"STDiT2 config: patch_size {list(self.patch_size)} must have 3 entries (T, H, W)")
        if self.hidden_size % 3 or self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise UserError(
                f"STDiT2 config: hidden_size {self.hidden_size} must be divisible by 3 (size embedders) and by "
                f"num_heads {self.num_heads} into an even head dimension"
            )
        if self.freeze not in FREEZE_OPTIONS:
            raise UserError(f"STDiT2 config: freeze {self.freeze!r} is not one of {list(FREEZE_OPTIONS)}")

def modulation(table, t_emb, t0_emb, x_mask):
    """Shift/scale/gate parameters per frame: `table` [K, C] plus the timestep embedding [B, K*C].

    Returns K tensors of shape [B, 1, 1, C], or [B, T, 1, C] when x_mask [B, T] selects the timestep-0
    embedding for conditioning frames. Broadcasts against tokens laid out [B, T, S, C].
    """
    num_chunks = table.shape[0]
    params = (table[None] + t_emb.reshape([t_emb.shape[0], num_chunks, -1])).unsqueeze(2)  # [B, K, 1, C]
    if x_mask is None:
        return [params[:, k : k + 1] for k in range(num_chunks)]
    params_zero = (table[None] + t0_emb.reshape([t0_emb.shape[0], num_chunks, -1])).unsqueeze(2)
    generated = x_mask[:, :, None, None]
    return [paddle.where(generated, params[:, k : k + 1], params_zero[:, k : k + 1]) for k in range(num_chunks)]


class STDiT2Block(nn.Layer):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, drop_path=0.0, qk_norm=False):
        super().__init__()
        self.hidden_size = hidden_size

        # spatial branch
        self.norm1 = layer_norm_without_affine(hidden_size)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.scale_shift_table = self.create_parameter(
            [6, hidden_size], default_initializer=nn.initializer.Normal(std=hidden_size**-0.5)
        )

        # cross attention
        self.cross_attn = MultiHeadCrossAttention(hidden_size, num_heads)

        # mlp branch
        self.norm2 = layer_norm_without_affine(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=approx_gelu)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

        # temporal branch
        self.norm_temp = layer_norm_without_affine(hidden_size)
        self.attn_temp = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, use_rope=True)
        self.scale_shift_table_temporal = self.create_parameter(
            [3, hidden_size], default_initializer=nn.initializer.Normal(std=hidden_size**-0.5)
        )

    def forward(self, x, y, t_spc, t_tmp, text_mask, x_mask, t0_spc, t0_tmp, T, S, rope_cos_sin, text_kv=None,
                attention_cache=None):
        """x [B, T*S, C]; y [B, L, C]; t_* [B, 6C] / [B, 3C]; text_mask [B, 1, 1, L] bool; x_mask [B, T] bool;
        text_kv: this block's precomputed caption keys and values (then y is not used); attention_cache: this
        block's `BlockAttentionCache` when sampling reuses attention outputs (see attention_cache.py)."""
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(
            self.scale_shift_table, t_spc, t0_spc, x_mask
        )
        shift_tmp, scale_tmp, gate_tmp = modulation(self.scale_shift_table_temporal, t_tmp, t0_tmp, x_mask)
        x = x.reshape([B, T, S, C])

        x_s = cached_attention(attention_cache, "spatial", self.spatial_attention, x, shift_msa, scale_msa)
        x = x + self.drop_path(gated(gate_msa, x_s))

        x_t = cached_attention(attention_cache, "temporal", self.temporal_attention, x, shift_tmp, scale_tmp, rope_cos_sin)
        x = x + self.drop_path(gated(gate_tmp, x_t))

        # cross attention to the caption (not modulated, as in PixArt)
        x_c = cached_attention(attention_cache, "cross", self.cross_attn, x.reshape([B, N, C]), y, text_mask, text_kv)
        x = x + x_c.reshape([B, T, S, C])

        # mlp
        x_m = t2i_modulate(self.norm2(x), shift_mlp, scale_mlp)
        x = x + self.drop_path(gated(gate_mlp, self.mlp(x_m)))
        return x.reshape([B, N, C])

    def spatial_attention(self, x, shift, scale):
        """Attention within each frame of the modulated tokens x [B, T, S, C]; returns [B, T, S, C]."""
        B, T, S, C = x.shape
        x_m = t2i_modulate(self.norm1(x), shift, scale)
        return self.attn(x_m.reshape([B * T, S, C])).reshape([B, T, S, C])

    def temporal_attention(self, x, shift, scale, rope_cos_sin):
        """Attention across frames at each spatial position of the modulated tokens x [B, T, S, C]."""
        B, T, S, C = x.shape
        x_m = t2i_modulate(self.norm_temp(x), shift, scale)
        x_t = x_m.transpose([0, 2, 1, 3]).reshape([B * S, T, C])
        return self.attn_temp(x_t, rope_cos_sin).reshape([B, S, T, C]).transpose([0, 2, 1, 3])


class STDiT2(AttentionCacheMixin, nn.Layer):
    def __init__(self, config: STDiT2Config):
        super().__init__()
        self.config = config
        self.pred_sigma = config.pred_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.pred_sigma else config.in_channels
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.depth = config.depth
        self.patch_size = config.patch_size
        self.input_sq_size = config.input_sq_size
        self.gradient_checkpointing = config.gradient_checkpointing

        self.pos_embed = PositionEmbedding2D(config.hidden_size)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.t_block = nn.Sequential(nn.Silu(), nn.Linear(config.hidden_size, 6 * config.hidden_size))
        self.t_block_temp = nn.Sequential(nn.Silu(), nn.Linear(config.hidden_size, 3 * config.hidden_size))
        self.y_embedder = CaptionEmbedder(
            in_channels=config.caption_channels,
            hidden_size=config.hidden_size,
            uncond_prob=config.class_dropout_prob,
            act_layer=approx_gelu,
            token_num=config.model_max_length,
        )
        self.rope = RotaryEmbedding(config.hidden_size // config.num_heads)
        drop_path_rates = np.linspace(0, config.drop_path, config.depth)
        self.blocks = nn.LayerList(
            [
                STDiT2Block(
                    config.hidden_size,
                    config.num_heads,
                    mlp_ratio=config.mlp_ratio,
                    drop_path=float(drop_path_rates[i]),
                    qk_norm=config.qk_norm,
                )
                for i in range(config.depth)
            ]
        )
        self.final_layer = T2IFinalLayer(config.hidden_size, int(np.prod(self.patch_size)), self.out_channels)

        # multi-resolution conditioning: (height, width) and aspect ratio share the hidden size in thirds
        self.csize_embedder = SizeEmbedder(self.hidden_size // 3)
        self.ar_embedder = SizeEmbedder(self.hidden_size // 3)
        self.fl_embedder = SizeEmbedder(self.hidden_size)
        self.fps_embedder = SizeEmbedder(self.hidden_size)

        self.initialize_weights()
        self.apply_freeze(config.freeze)

    # ------------------------------------------------------------------ initialisation and freezing

    def initialize_weights(self):
        xavier_uniform = nn.initializer.XavierUniform()
        zeros = nn.initializer.Constant(0.0)
        normal_002 = nn.initializer.Normal(std=0.02)
        for layer in self.sublayers():
            if isinstance(layer, nn.Linear):
                xavier_uniform(layer.weight)
                if layer.bias is not None:
                    zeros(layer.bias)

        # The patch embedding is initialised like a linear layer over the flattened patch.
        proj = self.x_embedder.proj
        fan_in = int(np.prod(proj.weight.shape[1:]))
        nn.initializer.XavierUniform(fan_in=fan_in, fan_out=proj.weight.shape[0])(proj.weight)
        bound = 1.0 / fan_in**0.5
        nn.initializer.Uniform(-bound, bound)(proj.bias)

        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1], self.t_block_temp[1]):
            normal_002(linear.weight)
        normal_002(self.y_embedder.y_proj.fc1.weight)
        normal_002(self.y_embedder.y_proj.fc2.weight)

        # Zero-initialised residual outputs: a new model starts as the identity on those branches.
        for block in self.blocks:
            for linear in (block.cross_attn.proj, block.attn_temp.proj):
                zeros(linear.weight)
                zeros(linear.bias)
        zeros(self.final_layer.linear.weight)
        zeros(self.final_layer.linear.bias)

    def apply_freeze(self, freeze):
        """`not_temporal` trains only the temporal attention; `text` freezes the cross-attention."""
        if freeze is None:
            return
        for name, param in self.named_parameters():
            if (freeze == "not_temporal" and "attn_temp" not in name) or (freeze == "text" and "cross_attn" in name):
                param.stop_gradient = True

    # ------------------------------------------------------------------ forward

    def get_dynamic_size(self, x):
        """Token grid (T, H, W) of a latent [B, C, T, H, W] after padding to the patch size."""
        return tuple(-(-size // patch) for size, patch in zip(x.shape[2:], self.patch_size))

    def forward(
        self, x, timestep, y, mask=None, x_mask=None, num_frames=None, height=None, width=None, ar=None, fps=None
    ):
        """Predict noise (and the variance interpolation when `pred_sigma`) for a batch of video latents.

        Args:
            x: latents [B, C, T, H, W].
            timestep: diffusion timesteps [B].
            y: caption features [B, 1, L, C_text] (a batch that is a multiple of `mask`'s repeats the mask), or
                a `CaptionContext` from `encode_caption` (then `mask` is ignored).
            mask: valid caption tokens [B, L] (1 = token, 0 = padding); None = all tokens valid.
            x_mask: [B, T] bool, True = frame to generate, False = conditioning frame (timestep-0 modulation).
            num_frames, height, width, ar, fps: conditioning scalars [B] in pixel units (ar = height / width).

        Returns:
            [B, out_channels, T, H, W] float32 with out_channels = 2 * C if `pred_sigma` else C.
        """
        B = x.shape[0]
        dtype = self.x_embedder.proj.weight.dtype
        x = x.astype(dtype)
        timestep = timestep.astype(dtype)

        # size, aspect-ratio, length and fps conditioning
        height, width = height.astype(dtype), width.astype(dtype)
        csize = self.csize_embedder(paddle.stack([height, width], axis=1), B)
        ar_emb = self.ar_embedder(ar.astype(dtype)[:, None], B)
        data_info = paddle.concat([csize, ar_emb], axis=1)
        fl = self.fl_embedder(num_frames.astype(dtype)[:, None], B) + self.fps_embedder(fps.astype(dtype)[:, None], B)

        # patch tokens plus the resolution-aware spatial position embedding
        _, _, Tx, Hx, Wx = x.shape
        T, H, W = self.get_dynamic_size(x)
        S = H * W
        # The original takes the resolution of the first sample; all samples of a batch share a bucket.
        resolution = paddle.sqrt(height[0].astype("float32") * width[0].astype("float32"))
        pos_emb = self.pos_embed(H, W, scale=resolution / self.input_sq_size, base_size=round(S**0.5), dtype=dtype)
        x = self.x_embedder(x)
        x = x.reshape([B, T, S, self.hidden_size])
        x = (x + expand_as(pos_emb[:, None], x)).reshape([B, T * S, self.hidden_size])

        # adaptive-norm modulation inputs: once per forward, shared by all blocks
        t = self.t_embedder(timestep, dtype=dtype)
        t_spc = self.t_block(t + data_info)
        t_tmp = self.t_block_temp(t + fl)
        t0_spc = t0_spc_mlp = t0_tmp_mlp = None
        if x_mask is not None:
            x_mask = x_mask.astype("bool")
            t0 = self.t_embedder(paddle.zeros_like(timestep), dtype=dtype)
            t0_spc = t0 + data_info
            t0_spc_mlp = self.t_block(t0_spc)
            t0_tmp_mlp = self.t_block_temp(t0 + fl)

        if isinstance(y, CaptionContext):
            caption, text_mask, keys_values = None, y.text_mask, y.keys_values
        else:
            caption, text_mask = self.embed_caption(y, mask)
            keys_values = [None] * len(self.blocks)

        block_caches = [None] * len(self.blocks)
        if self.attention_cache is not None and not self.training:
            block_caches = self.attention_cache.begin_step(timestep, (B, T, S), len(self.blocks))

        rope_cos_sin = self.rope.cos_sin(T, dtype)
        for block, text_kv, block_cache in zip(self.blocks, keys_values, block_caches):
            args = (x, caption, t_spc, t_tmp, text_mask, x_mask, t0_spc_mlp, t0_tmp_mlp, T, S, rope_cos_sin, text_kv)
            if self.gradient_checkpointing and self.training:
                x = recompute(block, *args)
            else:
                x = block(*args, attention_cache=block_cache)

        # Kept from the original for checkpoint parity: the final layer is modulated by the bare timestep
        # embedding, but by timestep-0 plus the size embedding for conditioning frames.
        x = self.final_layer(x, t, x_mask, t0_spc, T, S)
        x = self.unpatchify(x, T, H, W, Tx, Hx, Wx)
        return x.astype("float32")

    def embed_caption(self, y, mask=None):
        """Caption tokens [B, L, C] after the caption embedder (with training-time dropout) and the padding
        mask [B, 1, 1, L] (None when all tokens are valid). A mask of a smaller batch is repeated."""
        y = self.y_embedder(y.astype(self.x_embedder.proj.weight.dtype), self.training).squeeze(1)
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
        keys_values = [block.cross_attn.project_text(caption) for block in self.blocks]
        return CaptionContext(keys_values=keys_values, text_mask=text_mask)

    def unpatchify(self, x, N_t, N_h, N_w, R_t, R_h, R_w):
        """[B, N_t*N_h*N_w, T_p*H_p*W_p*C_out] -> [B, C_out, R_t, R_h, R_w], dropping the patch padding."""
        T_p, H_p, W_p = self.patch_size
        B = x.shape[0]
        x = x.reshape([B, N_t, N_h, N_w, T_p, H_p, W_p, self.out_channels])
        x = x.transpose([0, 7, 1, 4, 2, 5, 3, 6])
        x = x.reshape([B, self.out_channels, N_t * T_p, N_h * H_p, N_w * W_p])
        return x[:, :, :R_t, :R_h, :R_w]

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory):
        """Write `config.json` and `model.safetensors` (fp16 stays fp16; bf16 is stored as fp32)."""
        from safetensors.numpy import save_file

        state = {}
        for name, tensor in self.state_dict().items():
            if tensor.dtype == paddle.bfloat16:
                tensor = tensor.astype("float32")
            state[name] = np.ascontiguousarray(tensor.numpy())
        # File by file (weights first), so that saving into an existing checkpoint directory keeps its other files.
        os.makedirs(save_directory, exist_ok=True)
        with atomic_path(os.path.join(save_directory, WEIGHTS_NAME)) as tmp_path:
            save_file(state, tmp_path, metadata={"format": "paddle"})
        write_text_atomic(os.path.join(save_directory, CONFIG_NAME), json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_path, dtype=None, **config_overrides):
        """Build the model from `config.json` in `pretrained_path` and load `model.safetensors`.

        `config_overrides` replace config fields that do not change the weights (gradient_checkpointing,
        freeze).
        """
        config = dataclasses.replace(STDiT2Config.from_pretrained(pretrained_path), **config_overrides)
        model = cls(config)
        model.load_weights(os.path.join(pretrained_path, WEIGHTS_NAME))
        if dtype is not None:
            model.to(dtype=dtype)
        return model

    def load_weights(self, weights_path):
        """Load a safetensors file whose keys and shapes must match this model exactly."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            weights = load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise UserError(f"{weights_path}: cannot read the weights ({error}); the file may be truncated") from None
        state = self.state_dict()
        missing = [name for name in state if name not in weights]
        unexpected = [name for name in weights if name not in state]
        wrong_shape = [
            f"{name} {list(weights[name].shape)} != {list(state[name].shape)}"
            for name in state
            if name in weights and list(weights[name].shape) != list(state[name].shape)
        ]
        if missing or unexpected or wrong_shape:
            problems = []
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
                if names:
                    problems.append(f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
            raise UserError(
                f"{weights_path}: weights do not match the {type(self).__name__} config: {'; '.join(problems)}; check that "
                "config.json belongs to these weights"
            )
        self.set_state_dict({name: paddle.to_tensor(array).astype(state[name].dtype) for name, array in weights.items()})


def count_parameters(config: STDiT2Config):
    """Number of parameters of an STDiT2 with this config, built lazily (no weights are allocated)."""
    with paddle.LazyGuard():
        model = STDiT2(config)
    return sum(int(np.prod(param.shape)) for param in model.parameters())
