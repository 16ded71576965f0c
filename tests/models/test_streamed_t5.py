"""StreamedT5EncoderModel: the features of paddlenlp's T5EncoderModel from weights read one block at a time
(single and sharded safetensors), its memory bounded by one block, no checkpoint left mapped, and the
pipeline (`stream_text_encoder=True`) and the command line (`--stream-text-encoder`) giving the same frames
with it as with the whole encoder."""

import json
import os
import shutil

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from models.text_encoder.streamed_t5 import WEIGHTS_INDEX_NAME, StreamedT5EncoderModel, T5Weights, t5_encoder_shapes
from models.text_encoder.t5 import T5Encoder
from utils.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(REPO, "assets", "default_model")
IDS = [[5, 7, 9, 1, 0, 0], [3, 3, 8, 9, 11, 1]]
MASK = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A 3-block T5 encoder saved as paddlenlp saves it with safetensors, weights far from the initialisation."""
    from paddlenlp.transformers import T5Config, T5EncoderModel

    paddle.seed(3)
    model = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_ff=24, num_layers=3, num_heads=2, d_kv=8,
                                    feed_forward_proj="gated-gelu", dropout_rate=0.0))
    rng = np.random.default_rng(0)
    for param in model.parameters():
        param.set_value(rng.normal(0.0, 0.5, param.shape).astype("float32"))
    path = str(tmp_path_factory.mktemp("t5") / "t5")
    model.save_pretrained(path, safe_serialization=True)
    return path


def full_features(path, ids=IDS, mask=MASK):
    """The independent computation: paddlenlp's T5EncoderModel with every weight loaded."""
    from paddlenlp.transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(path)
    model.eval()
    with paddle.no_grad():
        return model(input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask))[0].numpy()


def streamed_features(model, ids=IDS, mask=MASK):
    return model(input_ids=paddle.to_tensor(ids), attention_mask=paddle.to_tensor(mask))[0].numpy()


def test_streamed_features_equal_the_whole_encoder(t5_dir):
    expected = full_features(t5_dir)
    streamed = StreamedT5EncoderModel.from_pretrained(t5_dir)
    np.testing.assert_allclose(streamed_features(streamed), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 0.5  # not a degenerate output
    # the padding mask matters (and is applied as the whole model applies it): valid tokens change with it
    unmasked = streamed_features(streamed, mask=[[1] * 6, [1] * 6])
    assert not np.allclose(unmasked[0, :4], expected[0, :4], atol=1e-3)
    assert streamed.parameters() == []


def test_shipped_encoder_and_t5encoder_wrapper():
    from paddlenlp.transformers import T5Tokenizer

    path = os.path.join(SHIPPED, "text_encoder")
    tokenizer = T5Tokenizer.from_pretrained(os.path.join(SHIPPED, "tokenizer"))
    whole = T5Encoder.from_pretrained(path, model_max_length=12)
    streamed = T5Encoder(StreamedT5EncoderModel.from_pretrained(path), tokenizer, model_max_length=12)
    texts = ["a red circle moving left", "a blue square moving up on a gray background"]
    a, b = whole.encode(texts), streamed.encode(texts)
    assert streamed.output_dim == whole.output_dim
    np.testing.assert_array_equal(a["mask"].numpy(), b["mask"].numpy())
    np.testing.assert_allclose(b["y"].numpy(), a["y"].numpy(), rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint(t5_dir, tmp_path):
    weights = load_file(os.path.join(t5_dir, "model.safetensors"))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({name: weights[name] for name in part}, str(tmp_path / file), metadata={"format": "np"})
    with open(tmp_path / WEIGHTS_INDEX_NAME, "w") as f:
        json.dump({"weight_map": {name: file for file, part in shards.items() for name in part}}, f)
    with open(os.path.join(t5_dir, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    streamed = StreamedT5EncoderModel.from_pretrained(str(tmp_path))
    np.testing.assert_allclose(streamed_features(streamed), full_features(t5_dir), rtol=1e-5, atol=1e-5)
    # saving copies the shards and writes the index; the copy loads as the original
    saved = tmp_path / "saved"
    streamed.save_pretrained(str(saved), safe_serialization=True)
    assert sorted(os.listdir(saved)) == sorted(["config.json", WEIGHTS_INDEX_NAME, *shards])
    np.testing.assert_allclose(full_features(str(saved)), full_features(t5_dir), rtol=1e-6, atol=1e-6)


def test_checkpoint_is_not_left_mapped(t5_dir):
    streamed = StreamedT5EncoderModel.from_pretrained(t5_dir)
    streamed_features(streamed)
    with open("/proc/self/maps") as f:
        assert os.path.realpath(os.path.join(t5_dir, "model.safetensors")) not in f.read()


def test_bad_checkpoints(t5_dir, tmp_path):
    with pytest.raises(UserError, match="not found"):
        StreamedT5EncoderModel.from_pretrained(str(tmp_path / "nothing"))
    shutil.copyfile(os.path.join(t5_dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(UserError, match="the streamed T5 encoder reads safetensors weights"):
        StreamedT5EncoderModel.from_pretrained(str(tmp_path))
    weights = load_file(os.path.join(t5_dir, "model.safetensors"))
    weights["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros([3, 16], np.float32)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wo\.weight: checkpoint shape \[3, 16\]"):
        streamed_features(StreamedT5EncoderModel.from_pretrained(str(tmp_path)))
    # a missing tensor is named when the model is built, before any block runs
    del weights["encoder.block.2.layer.0.SelfAttention.q.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"lacks 1 tensors of its config\.json, such as encoder\.block\.2\.layer\.0\.SelfAttention\.q\.weight"):
        StreamedT5EncoderModel.from_pretrained(str(tmp_path))


class ConstantWeights(T5Weights):
    """Weights of the right shapes, every tensor read allocated afresh (as a file read would be)."""

    def __init__(self, config):
        self.shapes = t5_encoder_shapes(config)

    def names(self):
        return list(self.shapes)

    def tensor(self, name):
        return np.full(self.shapes[name], 0.01, np.float32)


def test_memory_is_bounded_by_one_block_not_the_encoder():
    from paddlenlp.transformers import T5Config

    def peak_growth(num_layers):
        config = T5Config(vocab_size=64, d_model=512, d_ff=4096, num_layers=num_layers, num_heads=8, d_kv=64,
                          feed_forward_proj="gated-gelu", dropout_rate=0.0)
        model = StreamedT5EncoderModel(config, ConstantWeights(config))
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current resident memory
            f.write("5")
        before = status("VmRSS")
        streamed_features(model, ids=[[3] * 32], mask=[[1] * 32])
        return status("VmHWM") - before

    block = 4 * (4 * 512 * 512 + 3 * 512 * 4096)
    peak_growth(1)  # kernels and allocator pools that do not depend on the depth
    one, eight = peak_growth(1), peak_growth(8)
    assert eight < one + block, (one, eight, block)  # eight blocks would add 7 blocks (200 MB) if all were held
    assert eight < 3 * block


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def test_pipeline_frames_equal_with_the_streamed_encoder():
    from pipelines import OpenSoraPipeline

    prompt = "a red circle moving right on a dark background"
    frames = []
    for stream_text_encoder in (False, True):
        pipe = OpenSoraPipeline.from_pretrained(SHIPPED, stream_text_encoder=stream_text_encoder)
        pipe.set_progress_bar_config(disable=True)
        assert isinstance(pipe.text_encoder, StreamedT5EncoderModel) == stream_text_encoder
        frames.append(pipe(prompt, seed=1, num_inference_steps=2).frames)
    np.testing.assert_array_equal(frames[1], frames[0])


def test_pipeline_refuses_a_checkpoint_it_cannot_stream_before_loading_anything(tmp_path):
    """A pipeline directory whose T5 is not safetensors; it has no transformer or VAE either, so loading any
    model before checking the text encoder would fail with another message."""
    from pipelines import OpenSoraPipeline

    shutil.copyfile(os.path.join(SHIPPED, "model_index.json"), tmp_path / "model_index.json")
    (tmp_path / "text_encoder").mkdir()
    shutil.copyfile(os.path.join(SHIPPED, "text_encoder", "config.json"), tmp_path / "text_encoder" / "config.json")
    (tmp_path / "text_encoder" / "model_state.pdparams").write_bytes(b"")
    with pytest.raises(UserError, match="text_encoder: the streamed T5 encoder reads safetensors weights"):
        OpenSoraPipeline.from_pretrained(str(tmp_path), stream_text_encoder=True)


@pytest.fixture(scope="module")
def safetensors_t5(tiny_models, tmp_path_factory):
    """The tiny test T5 (saved as paddlenlp's default .pdparams) with its tokenizer, re-saved as safetensors."""
    from paddlenlp.transformers import T5EncoderModel

    path = str(tmp_path_factory.mktemp("t5") / "t5")
    shutil.copytree(tiny_models["text_encoder"], path, ignore=shutil.ignore_patterns("*.pdparams"))
    T5EncoderModel.from_pretrained(tiny_models["text_encoder"]).save_pretrained(path, safe_serialization=True)
    return path


def test_cli_flag_gives_the_same_video(tiny_models, safetensors_t5, tmp_path, capsys, monkeypatch):
    from pipelines.open_sora.cli import run_inference

    blocks = []
    load_block = StreamedT5EncoderModel.load_block
    monkeypatch.setattr(StreamedT5EncoderModel, "load_block", lambda self, index: blocks.append(index) or load_block(self, index))
    argv = ["--prompt", "a red circle moving left", "--model-path", tiny_models["stdit2"], "--vae-path", tiny_models["vae"],
            "--text-encoder-path", safetensors_t5, "--quiet"]
    run_inference([*argv, "--save-dir", str(tmp_path / "whole")], "test")
    assert blocks == []
    run_inference([*argv, "--save-dir", str(tmp_path / "streamed"), "--stream-text-encoder"], "test")
    assert blocks == [0]  # the tiny T5's one block, read once for the one prompt
    whole, streamed = capsys.readouterr().out.split()
    with open(whole, "rb") as a, open(streamed, "rb") as b:
        assert a.read() == b.read()

