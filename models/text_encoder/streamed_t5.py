"""`StreamedT5EncoderModel`: a T5 encoder that holds one block's weights at a time.

Open-Sora's text encoder, t5-v1_1-xxl, has 4.76B parameters: 19 GB in fp32, which it needs (its features
overflow in fp16). Loaded whole it does not fit next to anything else on a 24 GB machine. This model runs
the same forward as paddlenlp's `T5EncoderModel`, but reads each block's weights from the checkpoint just
before the hidden states go through it and frees them right after, so its memory is one block (0.77 GB for
XXL) plus the activations; the token embedding is read only at the rows of the prompt's tokens. The cost is
reading the checkpoint from disk at every `forward` (one pass over the file per batch of prompts).

    encoder = T5Encoder.from_pretrained("converted/t5", stream=True)

(`OpenSoraPipeline.from_pretrained(..., stream_text_encoder=True)` and `scripts/inference.py --stream-text-encoder`
load it so.) It holds no parameters, so it plugs in wherever a `T5EncoderModel` does (`T5Encoder`, the pipeline's
`text_encoder`). Weights come from a safetensors checkpoint (one file or index-sharded, as written by
`scripts/convert_checkpoint.py t5` and `save_pretrained(..., safe_serialization=True)`), or from any object
with the `T5Weights` interface (the real-scale benchmark draws random weights block by block). Every tensor
the config needs is looked up when the model is built, so an incomplete checkpoint fails before the first
block runs, not after minutes of streaming.
"""

import json
import os
import shutil

import numpy as np
import paddle
from safetensors import safe_open

from utils.errors import UserError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight")


def lazy_block(config, index):
    """Encoder block `index` of a paddlenlp `T5Config`, its parameters not allocated until they are given values
    (the first block also holds the relative position bias; the others reuse what it computes)."""
    from paddlenlp.transformers.t5.modeling import T5Block

    with paddle.LazyGuard():
        return T5Block(config, has_relative_attention_bias=index == 0)


def t5_encoder_shapes(config):
    """{name: shape} of every weight of the T5 encoder a paddlenlp `T5Config` describes (paddlenlp's names, Paddle's
    [in, out] Linear layout), read from lazily built blocks: nothing is allocated, even for XXL."""
    shapes = {"shared.weight": [config.vocab_size, config.d_model]}
    for index in range(config.num_layers):
        block = lazy_block(config, index)
        shapes.update({f"encoder.block.{index}.{name}": list(param.shape) for name, param in block.named_parameters()})
    shapes["encoder.final_layer_norm.weight"] = [config.d_model]
    return shapes


class T5Weights:
    """Where a streamed encoder gets its weights: `tensor(name)` (float32 numpy, Paddle layout: Linear weights
    are [in, out]) and `rows(name, ids)` (rows of a table, for the token embedding), by paddlenlp name."""

    def names(self):
        raise NotImplementedError

    def tensor(self, name):
        raise NotImplementedError

    def rows(self, name, ids):
        return self.tensor(name)[np.asarray(ids)]


class SafetensorsWeights(T5Weights):
    """The tensors of a safetensors checkpoint directory, each read through its own short-lived handle: a
    handle kept open maps the file, and every page read through it would stay resident (all 19 GB of XXL)."""

    def __init__(self, path):
        index_path = os.path.join(path, WEIGHTS_INDEX_NAME)
        single_path = os.path.join(path, WEIGHTS_NAME)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        elif os.path.isfile(single_path):
            with safe_open(single_path, "np") as f:
                self.files = dict.fromkeys(f.keys(), single_path)
        else:
            raise UserError(
                f"{path}: the streamed T5 encoder reads safetensors weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}) and "
                "this directory has none; convert the checkpoint with scripts/convert_checkpoint.py t5, or re-save it "
                "with save_pretrained(..., safe_serialization=True)"
            )

    def names(self):
        return list(self.files)

    def tensor(self, name):
        with safe_open(self.files[name], "np") as f:
            return f.get_tensor(name).astype("float32", copy=False)

    def rows(self, name, ids):
        with safe_open(self.files[name], "np") as f:
            table = f.get_slice(name)
            return np.concatenate([table[i : i + 1] for i in np.asarray(ids).tolist()]).astype("float32", copy=False)


class StreamedT5EncoderModel(paddle.nn.Layer):
    """paddlenlp `T5EncoderModel`'s forward (eval mode, fp32) with the weights streamed block by block.

    Args:
        config: a paddlenlp `T5Config`.
        weights: a `T5Weights` holding the encoder's tensors under paddlenlp's names.
    """

    def __init__(self, config, weights):
        super().__init__()
        self.config = config
        self.weights = weights
        names = set(weights.names())
        self.embedding_name = next((name for name in EMBEDDING_NAMES if name in names), None)
        if self.embedding_name is None:
            raise UserError(f"the T5 checkpoint has no token embedding ({' or '.join(EMBEDDING_NAMES)}); is it a T5 encoder?")
        missing = [name for name in t5_encoder_shapes(config) if name != "shared.weight" and name not in names]
        if missing:
            raise UserError(f"the T5 checkpoint lacks {len(missing)} tensors of its config.json, such as {missing[0]}; "
                            "is it a T5 encoder of that config?")
        self.eval()

    @classmethod
    def from_pretrained(cls, path):
        """The encoder of a T5 directory (config.json and safetensors weights); nothing is loaded until `forward`."""
        from paddlenlp.transformers import T5Config

        from models.text_encoder.t5 import T5Encoder

        T5Encoder.read_config(path)
        return cls(T5Config.from_pretrained(path), SafetensorsWeights(path))

    def save_pretrained(self, path, **kwargs):
        """Write config.json and copy the checkpoint's files (keyword arguments of `T5EncoderModel.save_pretrained`,
        such as `safe_serialization`, are accepted; the files are safetensors already)."""
        files = getattr(self.weights, "files", None)
        if files is None:
            raise TypeError(f"{type(self.weights).__name__} weights are not files; there is nothing to save")
        os.makedirs(path, exist_ok=True)
        self.config.save_pretrained(path)
        sources = sorted(set(files.values()))
        for source in sources:
            shutil.copyfile(source, os.path.join(path, os.path.basename(source)))
        if len(sources) > 1 or os.path.basename(sources[0]) != WEIGHTS_NAME:
            index = {"metadata": {}, "weight_map": {name: os.path.basename(file) for name, file in files.items()}}
            with open(os.path.join(path, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)

    def _materialise(self, layer, prefix):
        """Give the lazily built `layer` its weights from the checkpoint (no random initialisation runs)."""
        for name, param in layer.named_parameters():
            value = self.weights.tensor(prefix + name)
            if list(value.shape) != list(param.shape):
                raise UserError(f"{prefix + name}: checkpoint shape {list(value.shape)} != {list(param.shape)} of the config")
            param.set_value(value)
            del value  # before the next tensor is read: one tensor in transit at a time
        layer.eval()
        return layer

    def load_block(self, index):
        """Block `index` with its weights read from the checkpoint."""
        return self._materialise(lazy_block(self.config, index), f"encoder.block.{index}.")

    def embed(self, input_ids):
        """Token embeddings [B, L, d_model], read at the rows of the distinct tokens only."""
        ids = input_ids.numpy()
        distinct, inverse = np.unique(ids, return_inverse=True)
        rows = self.weights.rows(self.embedding_name, distinct)
        return paddle.to_tensor(rows[inverse.reshape(ids.shape)])

    @paddle.no_grad()
    def forward(self, input_ids, attention_mask=None):
        """input_ids [B, L] and attention_mask [B, L] (1 = token) -> (last hidden states [B, L, d_model],).

        The same computation as `T5EncoderModel(input_ids=..., attention_mask=...)`: the padding mask becomes
        an additive bias, the first block computes the relative position bias (mask included) and every
        later block reuses it, and a final RMS norm ends the stack.
        """
        from paddlenlp.transformers.t5.modeling import T5LayerNorm

        hidden_states = self.embed(input_ids)
        if attention_mask is None:
            attention_mask = paddle.ones(input_ids.shape)
        # paddlenlp's additive padding mask (T5Stack.get_extended_attention_mask), broadcast over heads and queries
        bias = (1.0 - attention_mask[:, None, None, :].astype("float32")) * -10000.0
        position_bias = None
        for index in range(self.config.num_layers):
            block = self.load_block(index)
            hidden_states, position_bias = block(hidden_states, attention_mask=bias, position_bias=position_bias)[:2]
            del block  # its weights are freed before the next block's are read
        with paddle.LazyGuard():
            final_norm = T5LayerNorm(self.config.d_model, eps=self.config.layer_norm_epsilon)
        hidden_states = self._materialise(final_norm, "encoder.final_layer_norm.")(hidden_states)
        return (hidden_states,)
