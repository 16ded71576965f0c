import numpy as np
import paddle

from schedulers.masking import FrameConditioning, mean_flat


def run_schedule(mask, timesteps, num_timesteps, strict):
    """Step through timesteps with a fake update (+1 per step) and a marker noise (+100)."""
    conditioning = FrameConditioning(paddle.to_tensor([mask]), num_timesteps, strict_model_mask=strict, integer_threshold=strict)
    z = paddle.zeros([1, 1, len(mask), 1, 1])
    x_masks = []
    for t in timesteps:
        z, x_mask, active = conditioning.begin_step(z, paddle.to_tensor([t]), lambda x, t: x + 100)
        x_masks.append(x_mask.numpy()[0].tolist())
        z = conditioning.end_step(z, z + 1, active)
    return z.numpy()[0, 0, :, 0, 0], x_masks


def test_v11_semantics_hold_then_renoise_once_then_generate():
    # 10 respaced steps, masks 1 (generate), 0 (hard condition), 0.4 (joins at t=4), 0.35 (floor -> 3)
    values, x_masks = run_schedule([1.0, 0.0, 0.4, 0.35], list(range(9, -1, -1)), 10, strict=True)
    assert values.tolist() == [10, 0, 100 + 5, 100 + 4]
    # the model sees frame 2 as generated only strictly after its threshold step (t < 4)
    assert [m[2] for m in x_masks] == [False] * 6 + [True] * 4
    assert all(m[0] for m in x_masks) and not any(m[1] for m in x_masks)


def test_v12_semantics_use_greater_or_equal():
    values, x_masks = run_schedule([1.0, 0.0, 0.5], [1000.0, 750.0, 500.0, 250.0], 1000, strict=False)
    assert values.tolist() == [4, 0, 100 + 2]
    assert [m[2] for m in x_masks] == [False, False, True, True]


def test_mean_flat_over_generated_frames_only():
    tensor = paddle.to_tensor(np.arange(2 * 2 * 3 * 1 * 2, dtype="float32").reshape([2, 2, 3, 1, 2]))
    mask = paddle.to_tensor([[True, False, True], [False, False, True]])
    expected = [tensor.numpy()[i][:, mask.numpy()[i]].mean() for i in range(2)]
    np.testing.assert_allclose(mean_flat(tensor, mask).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(mean_flat(tensor).numpy(), tensor.numpy().reshape(2, -1).mean(1), rtol=1e-6)


def test_v12_thresholds_are_not_truncated():
    # 0.5 * 999 = 499.5: reached at t = 499.5 (v1.2 compares real numbers); v1.1's truncation to 499 would not be
    conditioning = FrameConditioning(paddle.to_tensor([[0.5]]), 999, strict_model_mask=False)
    _, x_mask, active = conditioning.begin_step(paddle.zeros([1, 1, 1, 1, 1]), paddle.to_tensor([499.5]), lambda x, t: x)
    assert bool(active[0, 0]) and bool(x_mask[0, 0])


def test_mean_flat_batch_axis_and_frames_without_any_selected():
    tensor = paddle.to_tensor(np.arange(3 * 2 * 2, dtype="float32").reshape([3, 2, 2, 1, 1]))
    np.testing.assert_allclose(mean_flat(tensor).numpy(), tensor.numpy().reshape(3, -1).mean(1), rtol=1e-6)
    # a sample with no generated frame contributes 0, not NaN; one element per frame is averaged over itself
    mask = paddle.to_tensor([[False, False], [True, False], [False, True]])
    single = paddle.to_tensor(np.full([3, 1, 2, 1, 1], 5.0, dtype="float32"))
    np.testing.assert_array_equal(mean_flat(single, mask).numpy(), [0.0, 5.0, 5.0])
