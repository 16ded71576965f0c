"""Convert official Open-Sora v1.1 and v1.2 weights (PyTorch layouts) into the directories our loaders read.

    python scripts/convert_checkpoint.py stdit2 hpcai-tech/OpenSora-STDiT-v2-stage3/ converted/stdit2
    python scripts/convert_checkpoint.py stdit2 outputs/epoch3-global_step4000/ema.pt converted/stdit2 --config configs/stdit2/xl2.json
    python scripts/convert_checkpoint.py stdit3 hpcai-tech/OpenSora-STDiT-v3/ converted/stdit3
    python scripts/convert_checkpoint.py vae stabilityai/sd-vae-ft-ema/ converted/vae
    python scripts/convert_checkpoint.py vae-v1.2 hpcai-tech/OpenSora-VAE-v1.2/ converted/vae-v1.2
    python scripts/convert_checkpoint.py t5 DeepFloyd/t5-v1_1-xxl/ converted/t5

Sources are local files (download them where there is network, e.g. with `huggingface-cli download`).
Names are kept; the one layout difference is that PyTorch stores a Linear weight as [out, in] and Paddle as
[in, out], so Linear weights are transposed and nothing else is (convolutions and embeddings keep their
layout). Every source tensor must be used exactly once and every target tensor filled exactly once, with
the right shape; otherwise nothing is written and the offending keys are named. (The v1.2 VAE's `scale` and
`shift` tensors are used as config values.)
"""

import dataclasses
import glob
import json
import os
import shutil
import sys

# Run as `python scripts/<name>.py`: make the repo root importable without PYTHONPATH.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from utils.errors import UserError, run_cli  # noqa: E402
from utils.io import atomic_path, write_text_atomic  # noqa: E402

# Keys that `transformers` (any version: "torch_dtype" became "dtype", attention settings were added) or
# `diffusers` write into a config.json to describe the file or the runtime, not the model; plus the
# original's `input_size`, which STDiT2 and STDiT3 derive from the input instead.
HF_BOOKKEEPING = {
    "architectures", "model_type", "auto_map", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal",
    "use_cache", "return_dict", "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16",
    "_class_name", "_diffusers_version", "input_size",
}
NESTED_STATE_KEYS = ("model", "ema", "module", "state_dict")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The fields of the original's `VideoAutoencoderPipelineConfig`, what the config.json of an official v1.2 VAE
# holds besides bookkeeping.
ORIGINAL_VAE_V1_2_FIELDS = {"vae_2d", "vae_temporal", "from_pretrained", "freeze_vae_2d", "cal_loss", "micro_frame_size", "shift", "scale"}


# ------------------------------------------------------------------------------------------ reading


def read_state_dict(path, nested_key=None):
    """Tensors of a .safetensors / .bin / .pt / .pth file, or of every weight shard in a directory."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or sorted(glob.glob(os.path.join(path, "*.bin")))
        if not files:
            raise UserError(f"{path}: no *.safetensors or *.bin weights in this directory")
        state = {}
        for file in files:
            state.update(read_state_dict(file, nested_key))
        return state
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found; give a local checkpoint file or directory (no hub downloads here)")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for bad files
            raise UserError(f"{path}: cannot read safetensors ({error})") from None
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: PyTorch pickles need torch to read (pip install torch), or convert the file to "
                        "safetensors first") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and not any(hasattr(v, "shape") for v in state.values()):
        keys = [nested_key] if nested_key else [k for k in NESTED_STATE_KEYS if k in state]
        if not keys or keys[0] not in state:
            raise UserError(f"{path}: no state dict under {keys or list(NESTED_STATE_KEYS)}; top-level keys are {sorted(state)[:8]}")
        state = state[keys[0]]
    return {key.removeprefix("module."): value.float().numpy() if value.is_floating_point() else value.numpy() for key, value in state.items()}


def read_json(path):
    if not os.path.isfile(path):
        raise UserError(f"{path}: config.json not found")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------- mapping


def convert_state_dict(source, target_shapes, linear_weights, rename=lambda key: key, ignored=lambda key: False):
    """Map source tensors onto target names: rename, transpose Linear weights, check shapes and coverage."""
    converted, unused, wrong_shape = {}, [], []
    for key, value in source.items():
        if ignored(key):
            continue
        name = rename(key)
        if name not in target_shapes or name in converted:
            unused.append(key)
            continue
        value = np.ascontiguousarray(value.T) if name in linear_weights else value
        if list(value.shape) != list(target_shapes[name]):
            wrong_shape.append(f"{key} {list(value.shape)} -> {name} {list(target_shapes[name])}")
            continue
        converted[name] = value.astype(np.float32) if value.dtype.kind == "f" else value
    unfilled = [name for name in target_shapes if name not in converted]
    problems = [(label, names) for label, names in (("unused source keys", unused), ("target keys not filled", unfilled),
                                                    ("shape mismatches", wrong_shape)) if names]
    if problems:
        raise UserError("; ".join(f"{len(names)} {label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}" for label, names in problems)
                        + "; is the source the model and config you meant?")
    return converted


def layer_layout(model):
    """(shapes by state-dict name, names of Linear weights) of a Paddle model."""
    import paddle

    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    linear = {f"{name}.weight" for name, layer in model.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    return shapes, linear


# ---------------------------------------------------------------------------------------- models


def stdit_model(kind):
    """(model class, config class, what the official checkpoint is) of an STDiT subcommand."""
    if kind == "stdit2":
        from models.stdit.stdit2 import STDiT2, STDiT2Config

        return STDiT2, STDiT2Config, "an Open-Sora v1.1 STDiT2"
    from models.stdit.stdit3 import STDiT3, STDiT3Config

    return STDiT3, STDiT3Config, "an Open-Sora v1.2 STDiT3"


def convert_stdit(kind, source, output, config_path=None, nested_key=None):
    """An official STDiT checkpoint (hub directory with config.json, or a raw training checkpoint with
    --config) into a directory that `from_pretrained` of our model of that kind loads."""
    import paddle
    from safetensors.numpy import save_file

    from models.stdit.stdit2 import CONFIG_NAME, WEIGHTS_NAME

    model_class, config_class, description = stdit_model(kind)
    if os.path.isdir(source):
        values = read_json(os.path.join(source, "config.json")) if config_path is None else read_json(config_path)
    elif config_path is not None:
        values = read_json(config_path)
    else:
        raise UserError(f"{source}: a raw checkpoint has no config; pass --config configs/{kind}/xl2.json (or your model's)")
    values = {key: value for key, value in values.items() if key not in HF_BOOKKEEPING}
    config = config_class.from_dict(
        values, source=config_path or source, advice=f"these are not {model_class.__name__} fields; is the source {description}?"
    )
    with paddle.LazyGuard():  # names and shapes only: XL/2 is not allocated
        shapes, linear = layer_layout(model_class(config))
    weights = convert_state_dict(read_state_dict(source, nested_key), shapes, linear)
    with atomic_path(output) as tmp:
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "paddle"})
        write_text_atomic(os.path.join(tmp, CONFIG_NAME), json.dumps(config.to_dict(), indent=2) + "\n")


def old_attention_names(key):
    """diffusers renamed the VAE's attention projections; old checkpoints still carry the first names."""
    for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")):
        key = key.replace(old, new)
    return key


def convert_vae(source, output):
    from ppdiffusers import AutoencoderKL

    config = {key: value for key, value in read_json(os.path.join(source, "config.json")).items() if key not in HF_BOOKKEEPING}
    if "latent_channels" not in config:
        raise UserError(f"{source}: config.json is not an AutoencoderKL config")
    model = AutoencoderKL(**config)
    shapes, linear = layer_layout(model)
    weights = convert_state_dict(read_state_dict(source), shapes, linear, rename=old_attention_names)
    import paddle

    model.set_state_dict({name: paddle.to_tensor(value) for name, value in weights.items()})
    with atomic_path(output) as tmp:
        model.save_pretrained(tmp)


def convert_vae_v1_2(source, output, config_path=None, nested_key=None):
    """An official Open-Sora v1.2 VAE (`hpcai-tech/OpenSora-VAE-v1.2`: the original's config.json and weights;
    or a checkpoint file) into a directory that `VideoAutoencoderV1_2.from_pretrained` loads.

    The original's config.json names its two VAEs (`vae_2d`: an image VAE on the hub; `vae_temporal`:
    `VAE_Temporal_SD`) without their sizes; those come from `config_path` (default: the released model's,
    configs/vae_v1_2/official.json, whose spatial `scaling_factor` is the 0.18215 the original applies).
    `micro_frame_size`, `scale` and `shift` come from the original's config.json; the checkpoint's own `scale`
    and `shift` tensors win over it, as they do when the original loads its checkpoint. Parameter names are the
    original's (`spatial_vae.module.*`, `temporal_vae.*`)."""
    import paddle
    from safetensors.numpy import save_file

    from models.vae.vae_v1_2 import CONFIG_NAME, WEIGHTS_NAME, VideoAutoencoderV1_2, VideoAutoencoderV1_2Config

    config = VideoAutoencoderV1_2Config.from_json_file(config_path or os.path.join(REPO, "configs", "vae_v1_2", "official.json"))
    settings = {}
    if os.path.isfile(os.path.join(source, "config.json")):  # a hub directory; a training output has none
        original = {key: value for key, value in read_json(os.path.join(source, "config.json")).items() if key not in HF_BOOKKEEPING}
        unknown = sorted(set(original) - ORIGINAL_VAE_V1_2_FIELDS)
        if unknown:
            raise UserError(f"{source}: config.json keys {unknown[:5]} are not fields of the original's VideoAutoencoderPipelineConfig; "
                            "is the source an Open-Sora v1.2 VAE?")
        settings = {key: original[key] for key in ("micro_frame_size", "scale", "shift") if key in original}
    state = read_state_dict(source, nested_key)
    # str() of a float32 is its shortest decimal (3.85, not 3.8499999046325684): config.json stays readable.
    settings.update({key: [float(str(value)) for value in state.pop(key).ravel()] for key in ("scale", "shift") if key in state})
    config = dataclasses.replace(config, **settings)
    with paddle.LazyGuard():  # names and shapes only
        shapes, linear = layer_layout(VideoAutoencoderV1_2(config))
    weights = convert_state_dict(state, shapes, linear, rename=old_attention_names)
    with atomic_path(output) as tmp:
        os.makedirs(tmp)
        save_file(weights, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "paddle"})
        write_text_atomic(os.path.join(tmp, CONFIG_NAME), json.dumps(config.to_dict(), indent=2) + "\n")


def t5_encoder_layout(config):
    """Names and Paddle shapes of a T5 encoder's weights, and which are Linear, computed from its config
    (T5-XXL's encoder has 4.7B parameters: it is not built just to read its layout)."""
    d_model, inner, heads = config["d_model"], config["num_heads"] * config["d_kv"], config["num_heads"]
    feed_forward = ["wi_0", "wi_1"] if config.get("feed_forward_proj", "relu").startswith("gated") else ["wi"]
    shapes = {"shared.weight": [config["vocab_size"], d_model], "encoder.embed_tokens.weight": [config["vocab_size"], d_model],
              "encoder.final_layer_norm.weight": [d_model]}
    linear = set()
    for i in range(config["num_layers"]):
        block = f"encoder.block.{i}.layer"
        for name, shape in [("q", [d_model, inner]), ("k", [d_model, inner]), ("v", [d_model, inner]), ("o", [inner, d_model])]:
            shapes[f"{block}.0.SelfAttention.{name}.weight"] = shape
            linear.add(f"{block}.0.SelfAttention.{name}.weight")
        for name in feed_forward:
            shapes[f"{block}.1.DenseReluDense.{name}.weight"] = [d_model, config["d_ff"]]
        shapes[f"{block}.1.DenseReluDense.wo.weight"] = [config["d_ff"], d_model]
        linear.update(f"{block}.1.DenseReluDense.{name}.weight" for name in feed_forward + ["wo"])
        shapes[f"{block}.0.layer_norm.weight"] = [d_model]
        shapes[f"{block}.1.layer_norm.weight"] = [d_model]
    # Only the first block holds the relative position bias; the others reuse it.
    shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = [config.get("relative_attention_num_buckets", 32), heads]
    return shapes, linear


def convert_t5(source, output):
    from paddlenlp.transformers import T5Config, T5Tokenizer
    from safetensors.numpy import save_file

    values = {key: value for key, value in read_json(os.path.join(source, "config.json")).items() if key not in HF_BOOKKEEPING}
    if "d_model" not in values:
        raise UserError(f"{source}: config.json is not a T5 config")
    spiece = os.path.join(source, "spiece.model")
    if not os.path.isfile(spiece):
        raise UserError(f"{source}: spiece.model (the tokenizer) not found next to the weights")
    shapes, linear = t5_encoder_layout(values)
    state = read_state_dict(source)
    # The token embedding is tied to `shared`; safetensors exports keep only one copy.
    if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    # A full T5 checkpoint also holds the decoder and LM head, which the text encoder does not use.
    decoder_only = lambda key: key.startswith(("decoder.", "lm_head."))  # noqa: E731
    weights = convert_state_dict(state, shapes, linear, ignored=decoder_only)
    with atomic_path(output) as tmp:
        os.makedirs(tmp)
        T5Config(**values).save_pretrained(tmp)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "np"})
        T5Tokenizer(sentencepiece_model_file=spiece).save_pretrained(tmp)
        shutil.copy(spiece, os.path.join(tmp, "spiece.model"))


def main(argv):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["stdit2", "stdit3", "vae", "vae-v1.2", "t5"])
    parser.add_argument("source", help="local checkpoint directory or file")
    parser.add_argument("output", help="directory to write (replaced atomically)")
    parser.add_argument("--config", help="stdit2/stdit3: config JSON for a raw .pt/.pth checkpoint (e.g. configs/stdit3/xl2.json); "
                        "vae-v1.2: the sizes of its two VAEs (default configs/vae_v1_2/official.json)")
    parser.add_argument("--key", help="stdit2/stdit3/vae-v1.2: which nested state dict of a training checkpoint to use (model, ema, module)")
    args = parser.parse_args(argv)
    from utils.runtime import quiet_library_logs

    quiet_library_logs()
    if not os.path.exists(args.source):
        raise UserError(f"{args.source}: not found locally. Hub names cannot be fetched here: download the files "
                        "where there is network and pass the local path")
    if args.kind in ("stdit2", "stdit3"):
        convert_stdit(args.kind, args.source, args.output, args.config, args.key)
    elif args.kind == "vae":
        convert_vae(args.source, args.output)
    elif args.kind == "vae-v1.2":
        convert_vae_v1_2(args.source, args.output, args.config, args.key)
    else:
        convert_t5(args.source, args.output)
    print(args.output)


if __name__ == "__main__":
    run_cli(main)
