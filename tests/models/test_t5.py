import numpy as np
import paddle
import pytest

from models.text_encoder.t5 import T5Encoder, text_preprocessing
from utils.errors import UserError


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return T5Encoder.from_pretrained(tiny_models["text_encoder"], model_max_length=8)


def test_shapes_masks_and_padding(encoder):
    out = encoder.encode(["a red circle moving left", "a", "a red circle moving left on a black background"])
    assert out["y"].shape == [3, 1, 8, 16] and out["y"].dtype == paddle.float32
    # words + eos, truncated to the maximum length
    np.testing.assert_array_equal(out["mask"].numpy().sum(1), [6, 2, 8])
    assert encoder.output_dim == 16 and encoder.model_max_length == 8


def test_padding_does_not_change_valid_tokens(encoder):
    short = encoder.encode(["a red circle"])
    long = encoder.encode(["a red circle", "a red circle moving left on a black"])
    np.testing.assert_allclose(short["y"].numpy()[0, 0, :4], long["y"].numpy()[0, 0, :4], rtol=1e-5, atol=1e-6)


def test_null_caption_uses_the_model_embedding(encoder):
    with pytest.raises(RuntimeError, match="y_embedder"):
        encoder.null(2)

    class Embedder:
        y_embedding = paddle.arange(8 * 16, dtype="float32").reshape([8, 16])

    encoder.y_embedder = Embedder()
    null = encoder.null(2)
    assert null.shape == [2, 1, 8, 16]
    np.testing.assert_array_equal(null.numpy()[1, 0], Embedder.y_embedding.numpy())
    encoder.y_embedder = None


def test_caption_cleaning_keeps_plain_captions():
    assert text_preprocessing("a red circle moving left on a black background") == "a red circle moving left on a black background"
    assert text_preprocessing("A <b>Sunset</b> at https://example.com/x.png !!") == "a sunset at !!"


def test_bad_paths(tmp_path, tiny_models):
    with pytest.raises(UserError, match="not found"):
        T5Encoder.from_pretrained(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="not a T5"):
        T5Encoder.from_pretrained(tiny_models["vae"])
