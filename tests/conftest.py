"""Fixtures shared by the test suite: a tiny VAE, T5 text encoder and STDiT2 written to disk in the same
formats as the shipped and converted models, so tests exercise the real loading code."""

import io
import json
import os

import pytest

CAPTION_WORDS = (
    "a red green blue yellow white circle square triangle moving left right up down on black gray navy "
    "background sunset city car ocean sunrise scene"
).split()
TINY_TEXT_TOKENS = 8


def train_tiny_sentencepiece(path):
    import sentencepiece

    sentences = [" ".join(CAPTION_WORDS[i:] + CAPTION_WORDS[:i]) for i in range(len(CAPTION_WORDS))] * 10
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=len(CAPTION_WORDS) + 3, model_type="word",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())


def write_tiny_models(root):
    import numpy as np
    import paddle
    from paddlenlp.transformers import T5Config, T5EncoderModel, T5Tokenizer
    from ppdiffusers import AutoencoderKL

    from models.stdit.stdit2 import STDiT2, STDiT2Config

    paddle.seed(0)
    spiece = os.path.join(root, "spiece.model")
    train_tiny_sentencepiece(spiece)
    tokenizer = T5Tokenizer(sentencepiece_model_file=spiece)
    text_dir = os.path.join(root, "text_encoder")
    T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)

    vae_dir = os.path.join(root, "vae")
    AutoencoderKL(
        block_out_channels=(4, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=2, latent_channels=4, sample_size=64,
    ).save_pretrained(vae_dir)

    stdit_dir = os.path.join(root, "stdit2")
    config = STDiT2Config(
        input_sq_size=64, hidden_size=24, depth=1, num_heads=2, mlp_ratio=2.0, caption_channels=16,
        model_max_length=TINY_TEXT_TOKENS, pred_sigma=False, qk_norm=True,
    )
    # As initialised (zero final layer and output projections, as in the original) the model predicts exactly
    # zero whatever its input, so a sampler that dropped the caption or the conditioning would go unnoticed.
    stdit2 = STDiT2(config)
    rng = np.random.default_rng(0)
    for param in stdit2.parameters():
        if not param.numpy().any():
            param.set_value(rng.normal(0.0, 0.2, param.shape).astype("float32"))
    stdit2.save_pretrained(stdit_dir)
    defaults = dict(num_frames=4, image_size=[64, 64], fps=8, frame_interval=1, sampler="rflow", num_sampling_steps=2, cfg_scale=4.0)
    with open(os.path.join(stdit_dir, "inference.json"), "w") as f:
        json.dump(defaults, f)
    return dict(stdit2=stdit_dir, vae=vae_dir, text_encoder=text_dir)


@pytest.fixture(autouse=True)
def numpy_bool_type():
    """Importing ppdiffusers sets `np.bool = bool` (a numpy-1 shim), which makes numpy 2's own `assert_allclose`
    fail on scalars ('bool' object has no attribute 'any'), so a test's outcome would depend on whether an
    earlier test imported ppdiffusers. Every test starts with numpy's real scalar type."""
    import numpy as np

    np.bool = np.dtype(bool).type
    yield


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny STDiT2 (with inference.json and no zero weights), VAE (8x down) and T5 encoder (width 16)."""
    return write_tiny_models(str(tmp_path_factory.mktemp("tiny_models")))


@pytest.fixture(scope="session")
def tiny_model_flags(tiny_models):
    return ["--model-path", tiny_models["stdit2"], "--vae-path", tiny_models["vae"], "--text-encoder-path", tiny_models["text_encoder"]]
