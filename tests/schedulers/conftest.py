import paddle
import pytest


class FakeTextEncoder:
    """Captions are vectors whose value encodes the prompt length; null captions are zeros."""

    def encode(self, prompts):
        y = paddle.stack([paddle.full([1, 3, 4], float(len(p))) for p in prompts])
        return {"y": y, "mask": paddle.ones([len(prompts), 3], dtype="int64")}

    def null(self, n):
        return paddle.zeros([n, 1, 3, 4])


class FakeModel(paddle.nn.Layer):
    """Predicts a scaled copy of its input plus a caption-dependent offset; records its calls."""

    def __init__(self, out_factor=2):
        super().__init__()
        self.out_factor = out_factor
        self.weight = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(0.5))
        self.calls = []

    def forward(self, x, timestep, y=None, mask=None, x_mask=None, **size_args):
        self.calls.append(dict(batch=x.shape[0], timestep=timestep.numpy().copy(), x_mask=None if x_mask is None else x_mask.numpy().copy()))
        offset = y.mean(axis=[1, 2, 3]).reshape([-1, 1, 1, 1, 1]) * 0.01
        out = x * self.weight + offset
        return paddle.concat([out] * self.out_factor, axis=1) if self.out_factor > 1 else out


@pytest.fixture
def text_encoder():
    return FakeTextEncoder()


@pytest.fixture
def make_fake_model():
    return FakeModel


@pytest.fixture
def size_args():
    def build(batch):
        values = dict(height=64.0, width=64.0, num_frames=4.0, ar=1.0, fps=8.0)
        return {key: paddle.full([batch], value) for key, value in values.items()}

    return build
