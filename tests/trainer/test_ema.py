"""The exponential moving average of the weights: its update rule, export and reload, and the trainer's use of it."""

import os
import subprocess
import sys

import numpy as np
import paddle
from safetensors.numpy import load_file, save_file

from toy_world.synthetic import write_dataset
from trainer.trainer import ExponentialMovingAverage

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TwoLayers(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.trained = paddle.nn.Linear(3, 2)
        self.frozen = paddle.nn.Linear(2, 2)
        for param in self.frozen.parameters():
            param.stop_gradient = True


def numpy_weights(model):
    return {name: param.numpy().copy() for name, param in model.named_parameters()}


def test_update_is_decay_times_shadow_plus_the_rest_times_param():
    paddle.seed(0)
    model = TwoLayers()
    ema = ExponentialMovingAverage(model, decay=0.9)
    expected = {name: value.astype("float64") for name, value in numpy_weights(model).items() if name.startswith("trained")}
    assert set(ema.shadow) == set(expected)  # frozen parameters have no average
    rng = np.random.default_rng(0)
    for _ in range(3):
        for name, param in model.named_parameters():
            param.set_value(rng.standard_normal(param.shape).astype("float32"))
        ema.update(model)
        current = numpy_weights(model)
        for name in expected:
            expected[name] = 0.9 * expected[name] + 0.1 * current[name]
    for name, value in expected.items():
        np.testing.assert_allclose(ema.shadow[name].numpy(), value, rtol=1e-6, atol=1e-7, err_msg=name)
        assert ema.shadow[name].dtype == paddle.float32


def test_export_writes_the_averages_and_restores_the_model_and_load_reads_them_back(tmp_path):
    paddle.seed(1)
    model = TwoLayers()
    ema = ExponentialMovingAverage(model, decay=0.5)
    for param in model.trained.parameters():
        param.set_value(param + 2.0)
    ema.update(model)
    live = numpy_weights(model)

    def save(m, directory):
        os.makedirs(directory)
        save_file(numpy_weights(m), os.path.join(directory, "model.safetensors"))

    ema.export(model, str(tmp_path / "ema"), save)
    exported = load_file(str(tmp_path / "ema" / "model.safetensors"))
    for name, value in live.items():
        np.testing.assert_array_equal(numpy_weights(model)[name], value)  # training goes on with its own weights
        averaged = value - 1.0 if name.startswith("trained") else value  # halfway back to the start
        np.testing.assert_allclose(exported[name], averaged, rtol=1e-6, atol=1e-6, err_msg=name)

    class SavesItself(TwoLayers):
        def save_pretrained(self, directory):
            save(self, directory)

    own = SavesItself()
    own.set_state_dict(model.state_dict())
    ExponentialMovingAverage(own, decay=0.5).export(own, str(tmp_path / "default"))  # without `save`: save_pretrained
    np.testing.assert_array_equal(load_file(str(tmp_path / "default" / "model.safetensors"))["trained.weight"], live["trained.weight"])

    fresh = ExponentialMovingAverage(model, decay=0.5)
    fresh.load(str(tmp_path / "ema"))
    for name in fresh.shadow:
        np.testing.assert_array_equal(fresh.shadow[name].numpy(), exported[name])
    fresh.copy_to(model)
    for name, value in numpy_weights(model).items():
        np.testing.assert_array_equal(value, exported[name])


def test_trainer_exports_the_average_of_the_weights_of_every_step(tiny_models, tmp_path):
    clips = write_dataset(str(tmp_path / "clips"), num_clips=4, num_frames=4, num_heldout_clips_per_combination=0)[0]
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "scripts/trainer_opensora.py", "--do_train", "--output_dir", str(output), "--max_steps", "2",
         "--save_steps", "1", "--per_device_train_batch_size", "2", "--seed", "1", "--learning_rate", "1e-2",
         "--report_to", "none", "--data_path", clips, "--num_frames", "4", "--image_size", "64", "64",
         "--pretrained_model_path", tiny_models["stdit2"], "--vae_path", tiny_models["vae"],
         "--text_encoder_path", tiny_models["text_encoder"], "--sampler", "rflow", "--dataloader_num_workers", "0",
         "--ema_decay", "0.75"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    start = load_file(os.path.join(tiny_models["stdit2"], "model.safetensors"))
    steps = [load_file(str(output / f"checkpoint-{step}" / "model.safetensors")) for step in (1, 2)]
    averages = [load_file(str(output / f"checkpoint-{step}" / "ema" / "model.safetensors")) for step in (1, 2)]
    changed = [name for name in start if not np.array_equal(start[name], steps[1][name])]
    assert changed, "training did not change the weights; the average would be trivially right"
    for name in start:
        after_1 = 0.75 * start[name].astype("float64") + 0.25 * steps[0][name]
        after_2 = 0.75 * after_1 + 0.25 * steps[1][name]
        np.testing.assert_allclose(averages[0][name], after_1, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(averages[1][name], after_2, rtol=1e-5, atol=1e-6, err_msg=name)
