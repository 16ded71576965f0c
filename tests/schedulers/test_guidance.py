import numpy as np
import paddle

from schedulers.guidance import doubled, encode_prompts, guided_prediction


def test_prompts_are_encoded_once_as_the_conditional_then_the_null_half(text_encoder):
    class Plain(paddle.nn.Layer):
        pass

    text = encode_prompts(Plain(), text_encoder, ["ab", "abcd"])
    assert set(text) == {"y", "mask"}
    y = text["y"].numpy()
    assert y.shape == (4, 1, 3, 4)
    np.testing.assert_array_equal(y[:2].reshape(2, -1).mean(axis=1), [2.0, 4.0])  # the fake encoder's prompt lengths
    np.testing.assert_array_equal(y[2:], 0)  # null captions
    assert text["mask"].shape == [2, 3]


def test_models_with_encode_caption_get_the_doubled_captions_and_the_caption_mask(text_encoder):
    class Caching(paddle.nn.Layer):
        def encode_caption(self, y, mask):
            self.seen = (y.numpy(), mask.numpy())
            return "cached"

    model = Caching()
    assert encode_prompts(model, text_encoder, ["ab", "abcd"]) == {"y": "cached"}
    y, mask = model.seen
    assert y.shape == (4, 1, 3, 4) and np.all(y[2:] == 0) and mask.shape == (2, 3)


def test_one_model_call_on_the_doubled_batch_with_every_conditioning():
    class Recording(paddle.nn.Layer):
        def forward(self, x, t, x_mask=None, y=None, height=None):
            self.seen = dict(x=x.numpy(), t=t.numpy(), x_mask=x_mask.numpy(), y=y.numpy(), height=height.numpy())
            return x * 0

    model = Recording()
    z = paddle.to_tensor(np.arange(6, dtype="float32").reshape([2, 3, 1, 1, 1]))
    x_mask = paddle.to_tensor([[True], [False]])
    size_args = doubled({"height": paddle.to_tensor([64.0, 32.0])})
    guided_prediction(model, z, paddle.to_tensor([5.0, 7.0]), {"y": paddle.ones([4, 1])}, size_args, x_mask, 2.0, 3)
    np.testing.assert_array_equal(model.seen["x"], np.concatenate([z.numpy(), z.numpy()]))
    np.testing.assert_array_equal(model.seen["t"], [5, 7, 5, 7])
    np.testing.assert_array_equal(model.seen["x_mask"], [[True], [False], [True], [False]])
    np.testing.assert_array_equal(model.seen["height"], [64, 32, 64, 32])
    assert model.seen["y"].shape == (4, 1)
