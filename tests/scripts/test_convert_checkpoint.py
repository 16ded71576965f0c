"""Converter round trips on tiny checkpoints written in the PyTorch layouts (numpy + safetensors, no torch)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
from safetensors.numpy import save_file

from scripts.convert_checkpoint import convert_state_dict, convert_stdit, convert_t5, convert_vae, convert_vae_v1_2, layer_layout
from utils.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "stdit2_parity.npz")
ORIGINAL_CONFIG = dict(  # as the original STDiT2Config.save_pretrained writes it (plus HF bookkeeping)
    input_size=[None, None, None], input_sq_size=32, in_channels=4, patch_size=[1, 2, 2], hidden_size=48, depth=2,
    num_heads=2, mlp_ratio=2.0, class_dropout_prob=0.1, pred_sigma=True, drop_path=0.0, no_temporal_pos_emb=False,
    caption_channels=32, model_max_length=12, freeze=None, qk_norm=True, enable_flash_attn=False,
    enable_layernorm_kernel=False, architectures=["STDiT2"], model_type="STDiT2", torch_dtype="float32",
    transformers_version="4.36.2",
)


def torch_layout(model, rename=lambda key: key):
    """A Paddle model's weights as PyTorch would store them (Linear weights transposed)."""
    _, linear = layer_layout(model)
    return {rename(name): (value.numpy().T if name in linear else value.numpy()).copy() for name, value in model.state_dict().items()}


def test_stdit2_hf_directory_converts_to_the_original_outputs(tmp_path):
    from models.stdit.stdit2 import STDiT2

    fixture = np.load(FIXTURE)
    source = tmp_path / "OpenSora-STDiT-v2-tiny"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(ORIGINAL_CONFIG))
    save_file({k[len("weight/"):]: fixture[k] for k in fixture.files if k.startswith("weight/")}, str(source / "model.safetensors"))
    result = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "stdit2", str(source), str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model = STDiT2.from_pretrained(str(tmp_path / "out"))
    model.eval()
    size = {k[len("size/"):]: paddle.to_tensor(fixture[k]) for k in fixture.files if k.startswith("size/")}
    out = model(*(paddle.to_tensor(fixture[k]) for k in ("x", "timestep", "y")), mask=paddle.to_tensor(fixture["mask"]), **size)
    np.testing.assert_allclose(out.numpy(), fixture["out"], rtol=1e-4, atol=1e-4 * np.abs(fixture["out"]).max())


def test_stdit2_raw_training_checkpoint_needs_a_config_and_names_bad_keys(tmp_path):
    fixture = np.load(FIXTURE)
    weights = {k[len("weight/"):]: fixture[k] for k in fixture.files if k.startswith("weight/")}
    save_file(weights, str(tmp_path / "ema.safetensors"))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({k: v for k, v in ORIGINAL_CONFIG.items() if k != "input_size"}))
    with pytest.raises(UserError, match="pass --config"):
        convert_stdit("stdit2", str(tmp_path / "ema.safetensors"), str(tmp_path / "out"))
    convert_stdit("stdit2", str(tmp_path / "ema.safetensors"), str(tmp_path / "out"), config_path=str(config))
    assert (tmp_path / "out" / "model.safetensors").exists()

    broken = dict(weights)
    broken["blocks.0.attn.extra.weight"] = broken.pop("blocks.0.attn.qkv.weight")
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match=r"unused source keys: blocks\.0\.attn\.extra\.weight.*not filled: blocks\.0\.attn\.qkv\.weight"):
        convert_stdit("stdit2", str(tmp_path / "broken.safetensors"), str(tmp_path / "out2"), config_path=str(config))
    assert not (tmp_path / "out2").exists()


STDIT3_FIXTURE = os.path.join(REPO, "tests", "fixtures", "stdit3_parity.npz")
ORIGINAL_STDIT3_CONFIG = dict(  # the fields and bookkeeping keys of the hub's OpenSora-STDiT-v3 config.json, tiny sizes
    architectures=["STDiT3"], caption_channels=32, class_dropout_prob=0.1, depth=2, drop_path=0.0,
    enable_flash_attn=True, enable_layernorm_kernel=True, enable_sequence_parallelism=False, freeze_y_embedder=True,
    hidden_size=48, in_channels=4, input_size=[None, None, None], input_sq_size=32, mlp_ratio=2.0, model_max_length=12,
    model_type="STDiT3", num_heads=2, only_train_temporal=False, patch_size=[1, 2, 2], pred_sigma=True, qk_norm=True,
    skip_y_embedder=False, torch_dtype="float32", transformers_version="4.36.2",
)


def original_stdit3_weights():
    """The original PyTorch STDiT3's state dict (official key names, PyTorch layouts) and the fixture."""
    fixture = np.load(STDIT3_FIXTURE)
    return {k[len("weight/"):]: fixture[k] for k in fixture.files if k.startswith("weight/")}, fixture


def test_stdit3_hf_directory_converts_to_the_original_outputs(tmp_path):
    from models.stdit.stdit3 import STDiT3

    weights, fixture = original_stdit3_weights()
    source = tmp_path / "OpenSora-STDiT-v3-tiny"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(ORIGINAL_STDIT3_CONFIG))
    save_file(weights, str(source / "model.safetensors"))
    # In process: the command line around it is the one stdit2's test runs.
    convert_stdit("stdit3", str(source), str(tmp_path / "out"))
    converted_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert converted_config["freeze_y_embedder"] is True and converted_config["model_type"] == "STDiT3"
    model = STDiT3.from_pretrained(str(tmp_path / "out"))
    model.eval()
    size = {k[len("size/"):]: paddle.to_tensor(fixture[k]) for k in fixture.files if k.startswith("size/")}
    out = model(*(paddle.to_tensor(fixture[k]) for k in ("x", "timestep", "y")), mask=paddle.to_tensor(fixture["mask"]),
                x_mask=paddle.to_tensor(fixture["x_mask"]), **size)
    np.testing.assert_allclose(out.numpy(), fixture["out_x_mask"], rtol=1e-4, atol=1e-4 * np.abs(fixture["out_x_mask"]).max())


def test_stdit3_incomplete_checkpoint_is_refused_in_one_line_naming_the_missing_keys(tmp_path):
    weights, _ = original_stdit3_weights()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(ORIGINAL_STDIT3_CONFIG))
    incomplete = {k: v for k, v in weights.items() if k not in ("temporal_blocks.1.mlp.fc2.weight", "fps_embedder.mlp.0.bias")}
    save_file(incomplete, str(tmp_path / "ema.safetensors"))
    with pytest.raises(UserError) as refused:
        convert_stdit("stdit3", str(tmp_path / "ema.safetensors"), str(tmp_path / "out"), config_path=str(config))
    message = str(refused.value)
    assert "\n" not in message and "2 target keys not filled" in message
    assert "fps_embedder.mlp.0.bias" in message and "temporal_blocks.1.mlp.fc2.weight" in message
    assert not (tmp_path / "out").exists()

    # An Open-Sora v1.1 config is not an STDiT3's; a raw checkpoint needs one.
    v11_config = tmp_path / "v11.json"
    v11_config.write_text(json.dumps(ORIGINAL_CONFIG))
    with pytest.raises(UserError, match=r"unknown STDiT3 config keys \['freeze', 'no_temporal_pos_emb'\].*Open-Sora v1.2 STDiT3"):
        convert_stdit("stdit3", str(tmp_path / "ema.safetensors"), str(tmp_path / "out"), config_path=str(v11_config))
    with pytest.raises(UserError, match="pass --config configs/stdit3/xl2.json"):
        convert_stdit("stdit3", str(tmp_path / "ema.safetensors"), str(tmp_path / "out"))


def test_vae_diffusers_layout_with_old_attention_names(tmp_path):
    from ppdiffusers import AutoencoderKL

    paddle.seed(0)
    config = dict(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  norm_num_groups=4, latent_channels=4, sample_size=16)
    model = AutoencoderKL(**config)
    model.eval()
    source = tmp_path / "sd-vae"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **config}))
    old = lambda k: k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.").replace(".to_out.0.", ".proj_attn.")  # noqa: E731
    save_file(torch_layout(model, old), str(source / "diffusion_pytorch_model.safetensors"))
    convert_vae(str(source), str(tmp_path / "out"))
    converted = AutoencoderKL.from_pretrained(str(tmp_path / "out"))
    converted.eval()
    x = paddle.randn([1, 3, 16, 16])
    np.testing.assert_allclose(converted.encode(x).latent_dist.mean.numpy(), model.encode(x).latent_dist.mean.numpy(), rtol=1e-5, atol=1e-6)


VAE_V1_2_FIXTURE = os.path.join(REPO, "tests", "fixtures", "vae_v1_2_parity.npz")
VAE_V1_2_TINY = os.path.join(REPO, "configs", "vae_v1_2", "tiny.json")
ORIGINAL_VAE_V1_2_CONFIG = dict(  # what the original's VideoAutoencoderPipelineConfig writes for OpenSoraVAE_V1_2
    architectures=["VideoAutoencoderPipeline"], model_type="VideoAutoencoderPipeline", torch_dtype="float32",
    transformers_version="4.36.2", cal_loss=False, freeze_vae_2d=False, from_pretrained=None, micro_frame_size=17,
    scale=[3.85, 2.32, 2.33, 3.06], shift=[-0.1, 0.34, 0.27, 0.98],
    vae_2d=dict(type="VideoAutoencoderKL", from_pretrained="PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers", subfolder="vae",
                micro_batch_size=4, local_files_only=False),
    vae_temporal=dict(type="VAE_Temporal_SD", from_pretrained=None),
)


def original_vae_v1_2_directory(path, config=ORIGINAL_VAE_V1_2_CONFIG, drop=()):
    """A hub-layout directory (the original's config.json and state dict, `scale`/`shift` buffers included) of the
    tiny VAE of the parity fixture; returns the fixture."""
    fixture = np.load(VAE_V1_2_FIXTURE)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    weights = {k[len("weight/"):]: fixture[k] for k in fixture.files if k.startswith("weight/") and k[len("weight/"):] not in drop}
    save_file(weights, str(path / "model.safetensors"))
    return fixture


def test_vae_v1_2_hub_directory_converts_to_the_original_outputs(tmp_path):
    from models.vae.vae_v1_2 import VideoAutoencoderV1_2

    # The checkpoint's scale/shift tensors, not the config's numbers, are what the original computes with.
    fixture = original_vae_v1_2_directory(tmp_path / "OpenSora-VAE-v1.2", {**ORIGINAL_VAE_V1_2_CONFIG, "scale": 1.0, "shift": 0.0})
    convert_vae_v1_2(str(tmp_path / "OpenSora-VAE-v1.2"), str(tmp_path / "out"), config_path=VAE_V1_2_TINY)
    converted_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert converted_config["scale"] == [3.85, 2.32, 2.33, 3.06] and converted_config["micro_frame_size"] == 17
    vae = VideoAutoencoderV1_2.from_pretrained(str(tmp_path / "out"), micro_batch_size=4)
    z = vae.encode(paddle.to_tensor(fixture["encode/partial_chunk/x"]), sample_posterior=False)
    expected = fixture["encode/partial_chunk/z"]
    np.testing.assert_allclose(z.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    x = vae.decode(paddle.to_tensor(fixture["decode/two_chunks/z"]), num_frames=34)
    expected = fixture["decode/two_chunks/x"]
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_vae_v1_2_wrong_or_incomplete_checkpoints_are_refused_in_one_line(tmp_path):
    missing = ("temporal_vae.decoder.conv_blocks.1.conv.bias", "spatial_vae.module.decoder.conv_out.weight")
    original_vae_v1_2_directory(tmp_path / "incomplete", drop=missing)
    with pytest.raises(UserError) as refused:
        convert_vae_v1_2(str(tmp_path / "incomplete"), str(tmp_path / "out"), config_path=VAE_V1_2_TINY)
    message = str(refused.value)
    assert "\n" not in message and "2 target keys not filled" in message and all(key in message for key in missing)
    # The tiny weights against the released sizes (the default): the shapes disagree.
    with pytest.raises(UserError, match=r"shape mismatches: spatial_vae\.module\..* -> .*\[512\]"):
        convert_vae_v1_2(str(tmp_path / "incomplete"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

    original_vae_v1_2_directory(tmp_path / "stdit3", config=ORIGINAL_STDIT3_CONFIG)
    with pytest.raises(UserError, match=r"config.json keys \['caption_channels', .* not fields of the original's VideoAutoencoderPipelineConfig"):
        convert_vae_v1_2(str(tmp_path / "stdit3"), str(tmp_path / "out"), config_path=VAE_V1_2_TINY)


def test_t5_transformers_layout_skips_the_decoder(tmp_path, tiny_models):
    from paddlenlp.transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(tiny_models["text_encoder"])
    model.eval()
    source = tmp_path / "t5"
    source.mkdir()
    config = json.loads(open(os.path.join(tiny_models["text_encoder"], "config.json")).read())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["T5ForConditionalGeneration"]}))
    weights = torch_layout(model)
    weights["decoder.final_layer_norm.weight"] = np.ones(16, dtype=np.float32)
    save_file(weights, str(source / "model.safetensors"))
    shutil.copy(os.path.join(tiny_models["text_encoder"], "spiece.model"), source / "spiece.model")
    convert_t5(str(source), str(tmp_path / "out"))
    converted = T5EncoderModel.from_pretrained(str(tmp_path / "out"))
    converted.eval()
    ids = paddle.to_tensor([[3, 4, 5, 1]])
    np.testing.assert_allclose(converted(ids)[0].numpy(), model(ids)[0].numpy(), rtol=1e-5, atol=1e-6)


def test_shape_mismatch_is_named():
    with pytest.raises(UserError, match=r"shape mismatches: w \[2, 3\] -> w \[2, 2\]"):
        convert_state_dict({"w": np.zeros((2, 3))}, {"w": [2, 2]}, set())


def test_hub_name_without_network_says_how_to_convert(tmp_path):
    result = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "vae", "stabilityai/sd-vae-ft-ema", str(tmp_path / "o")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "download the files" in result.stderr and "Traceback" not in result.stderr
