import importlib.util
import os

import numpy as np
import paddle
from paddlenlp.transformers import T5EncoderModel, T5Tokenizer

from toy_world import synthetic

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "toy_world", "make_text_encoder.py")


def load_script():
    spec = importlib.util.spec_from_file_location("make_text_encoder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_text_encoder_loads_back_and_tokenizes_captions_without_unk(tmp_path):
    output_dir = str(tmp_path / "text_encoder")
    load_script().main(["--output-dir", output_dir])
    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))

    tokenizer = T5Tokenizer.from_pretrained(output_dir)
    model = T5EncoderModel.from_pretrained(output_dir)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert model.config.vocab_size == len(tokenizer)

    text = synthetic.caption("blue", "triangle", "down", "gray")
    ids = tokenizer(text)["input_ids"]
    # One token per word, then </s>.
    assert len(ids) == len(text.split()) + 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    # Text outside the caption vocabulary is spelled with byte tokens rather than lost to <unk>.
    assert tokenizer.unk_token_id not in tokenizer("A Sunset over the SEA!")["input_ids"]

    model.eval()
    with paddle.no_grad():
        hidden = model(paddle.to_tensor([ids]))[0]
    assert hidden.shape == [1, len(ids), 64]
    assert np.isfinite(hidden.numpy()).all()
    # Different colour words give different caption embeddings.
    other = tokenizer(synthetic.caption("red", "triangle", "down", "gray"))["input_ids"]
    with paddle.no_grad():
        other_hidden = model(paddle.to_tensor([other]))[0]
    assert not np.allclose(hidden.numpy()[0, 1], other_hidden.numpy()[0, 1], atol=1e-3)
