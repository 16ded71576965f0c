"""End-to-end runs of scripts/trainer_opensora.py on a few generated clips with the tiny models."""

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file

from toy_world.synthetic import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "trainer_opensora.py")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    train_csv, heldout_csv = write_dataset(str(tmp_path_factory.mktemp("clips")), num_clips=8, num_frames=4, num_heldout_clips_per_combination=0)
    return train_csv


def train_command(tiny_models, clips, output_dir, max_steps, extra=()):
    return [
        "--do_train", "--output_dir", str(output_dir), "--max_steps", str(max_steps), "--save_steps", "2",
        "--save_strategy", "steps", "--logging_steps", "1", "--per_device_train_batch_size", "2", "--seed", "1",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--report_to", "none", "--data_path", clips, "--num_frames", "4",
        "--image_size", "64", "64", "--pretrained_model_path", tiny_models["stdit2"], "--vae_path", tiny_models["vae"],
        "--text_encoder_path", tiny_models["text_encoder"], "--sampler", "rflow", "--dataloader_num_workers", "0",
        *extra,
    ]


def run(args, launcher=(), cwd=REPO, **kwargs):
    result = subprocess.run([sys.executable, *launcher, *args], cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def test_train_checkpoint_resume_in_new_process_matches_uninterrupted_run(tiny_models, clips, tmp_path):
    interrupted = tmp_path / "interrupted"
    first = run([SCRIPT, *train_command(tiny_models, clips, interrupted, 2)])
    checkpoint = interrupted / "checkpoint-2"
    assert (checkpoint / "checkpoint_complete").exists() and (checkpoint / "model.safetensors").exists()
    assert "loss:" in first.stdout + first.stderr, "no loss was logged"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(np.isfinite(entry["loss"]) for entry in state["log_history"] if "loss" in entry)

    # The same command with more steps resumes from checkpoint-2 in a new process ...
    resumed = run([SCRIPT, *train_command(tiny_models, clips, interrupted, 4)])
    assert "resuming from" in resumed.stdout + resumed.stderr
    # ... and ends exactly where an uninterrupted run of the same seed ends.
    straight = tmp_path / "straight"
    run([SCRIPT, *train_command(tiny_models, clips, straight, 4, extra=("--save_total_limit", "1"))])
    # paddlenlp alone never rotates in a single-process run; ours keeps the newest complete checkpoint
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-4"]
    a, b = weights(interrupted / "checkpoint-4"), weights(straight / "checkpoint-4")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)

    # the exported weights load in inference
    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, "scripts/inference.py", "--prompt", "a red circle moving left on a black background",
         "--model-path", str(interrupted / "checkpoint-4"), "--vae-path", tiny_models["vae"],
         "--text-encoder-path", tiny_models["text_encoder"], "--num-frames", "4", "--image-size", "64", "64",
         "--sampler", "rflow", "--num-sampling-steps", "2", "--save-dir", str(out), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.exists(result.stdout.strip().splitlines()[-1])


def test_held_out_loss_is_logged_at_fixed_timesteps(tiny_models, clips, tmp_path):
    # Learning rate 0 keeps the weights, so both evaluations measure the same model: with fixed timesteps and
    # fixed noise they must give the same number, although a training step drew random numbers in between.
    extra = ("--eval_data_path", clips, "--eval_max_samples", "2", "--evaluation_strategy", "steps", "--eval_steps", "1",
             "--rflow_use_timestep_transform", "true", "--rflow_transform_scale", "6", "--learning_rate", "0")
    run([SCRIPT, *train_command(tiny_models, clips, tmp_path / "out", 2, extra)])
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    evaluations = [(entry["step"], entry["eval_loss"]) for entry in state["log_history"] if "eval_loss" in entry]
    training_losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert [step for step, _ in evaluations] == [1, 2]
    (_, first), (_, second) = evaluations
    assert np.isfinite(first) and first > 0 and first == second
    assert len(set(training_losses)) == 2  # training itself drew different timesteps and noise at each step
    # a model trained with the timestep shift is sampled with it
    defaults = json.loads((tmp_path / "out" / "checkpoint-2" / "inference.json").read_text())
    assert (defaults["sampler"], defaults["use_timestep_transform"], defaults["transform_scale"]) == ("rflow", True, 6.0)

    # Which timesteps: a scheduler whose loss is t / T plus a little noise shows them, in process.
    from paddlenlp.trainer import TrainingArguments

    from trainer.trainer import OpenSoraTrainer

    class RecordingScheduler:
        num_timesteps = 1000
        timesteps = []

        def training_losses(self, model, latents, model_kwargs, t=None, **kwargs):
            self.timesteps.append(t.numpy().tolist())
            return {"loss": t.astype("float32") / 1000 + 1e-3 * paddle.randn([latents.shape[0]])}

    class PosteriorOnlyVAE:
        scaling_factor = 1.0

    class ZeroText:
        def encode(self, texts):
            return {"y": paddle.zeros([len(texts), 1, 2, 4]), "mask": paddle.ones([len(texts), 2], dtype="int64")}

    def collate(samples):
        batch = {key: np.stack([sample[key] for sample in samples]) for key in ("latent_mean", "latent_std", "num_frames", "height", "width", "ar", "fps")}
        return dict(batch, text=[sample["text"] for sample in samples])

    held_out = [dict(latent_mean=np.zeros([4, 1, 2, 2], "float32"), latent_std=np.ones([4, 1, 2, 2], "float32"), text="a",
                     num_frames=np.float32(1), height=np.float32(16), width=np.float32(16), ar=np.float32(1), fps=np.float32(8))] * 2
    scheduler = RecordingScheduler()
    trainer = OpenSoraTrainer(model=paddle.nn.Linear(2, 2), args=TrainingArguments(output_dir=str(tmp_path / "in_process"), seed=5, report_to=[]),
                              vae=PosteriorOnlyVAE(), text_encoder=ZeroText(), scheduler=scheduler, eval_dataset=held_out, data_collator=collate)
    paddle.seed(1)
    untouched = paddle.rand([3]).numpy()
    paddle.seed(1)
    first = trainer.evaluate()["eval_loss"]
    assert np.array_equal(paddle.rand([3]).numpy(), untouched)  # evaluation leaves the training random state alone
    assert trainer.evaluate()["eval_loss"] == first
    assert scheduler.timesteps == [[100], [300], [500], [700], [900]] * 4
    assert abs(first - 0.5) < 0.01  # the mean of t / T over the five fixed timesteps


def test_two_process_cpu_run_keeps_ranks_identical(tiny_models, clips, tmp_path):
    log_dir = tmp_path / "logs"
    env = dict(os.environ)
    env.pop("PADDLE_TRAINERS_NUM", None)
    run(
        [SCRIPT, *train_command(tiny_models, clips, tmp_path / "out", 2)],
        launcher=("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir)),
        env=env,
    )
    log = (log_dir / "workerlog.0").read_text()
    assert "weights identical on all 2 ranks" in log
    assert (tmp_path / "out" / "checkpoint-2" / "checkpoint_complete").exists()


def test_overfitting_one_batch_drives_the_loss_down():
    from models.stdit.stdit2 import STDiT2, STDiT2Config
    from schedulers.rflow import RFLOW

    paddle.seed(0)
    model = STDiT2(STDiT2Config(input_sq_size=32, hidden_size=48, depth=2, num_heads=2, caption_channels=16, model_max_length=4, pred_sigma=False, class_dropout_prob=0.0))
    model.train()
    scheduler = RFLOW()
    latents = paddle.randn([2, 4, 3, 4, 4])
    noise = paddle.randn(latents.shape)
    t = paddle.to_tensor([300.0, 700.0])
    kwargs = dict(y=paddle.randn([2, 1, 4, 16]), mask=paddle.ones([2, 4], dtype="int64"),
                  **{k: paddle.full([2], v) for k, v in dict(height=32.0, width=32.0, num_frames=3.0, ar=1.0, fps=8.0).items()})
    optimizer = paddle.optimizer.AdamW(learning_rate=3e-3, parameters=model.parameters())
    losses = []
    for _ in range(60):
        loss = scheduler.training_losses(model, latents, kwargs, t=t, noise=noise)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_stdit3_trains_on_latents_of_the_video_vae_on_two_processes(tiny_models, tmp_path):
    """Open-Sora v1.2 through the same trainer: a new STDiT3 from configs/stdit3, clips of 20 frames pre-encoded
    by the tiny video VAE (6 latent frames each), rectified flow with frame masks, 2 CPU processes."""
    from models.vae.vae_v1_2 import VideoAutoencoderV1_2, VideoAutoencoderV1_2Config

    clips_csv, _ = write_dataset(str(tmp_path / "clips"), num_clips=4, num_frames=20, num_heldout_clips_per_combination=0)
    paddle.seed(0)
    vae_dir = str(tmp_path / "vae")
    VideoAutoencoderV1_2(VideoAutoencoderV1_2Config.from_json_file(os.path.join(REPO, "configs", "vae_v1_2", "tiny.json"))).save_pretrained(vae_dir)
    run([os.path.join(REPO, "scripts", "encode_latents.py"), "--data-path", clips_csv, "--vae-path", vae_dir,
         "--num-frames", "20", "--image-size", "16", "16", "--output-dir", str(tmp_path / "latents")])
    first = np.load(next(str(p) for p in (tmp_path / "latents").rglob("*.npz")))
    assert first["mean"].shape == (4, 6, 8, 8) and (first["std"] > 0).all()
    config = json.load(open(os.path.join(REPO, "configs", "stdit3", "tiny.json")))
    config.update(caption_channels=16, model_max_length=8)
    (tmp_path / "stdit3.json").write_text(json.dumps(config))
    log_dir = tmp_path / "logs"
    env = dict(os.environ)
    env.pop("PADDLE_TRAINERS_NUM", None)
    run([SCRIPT, "--do_train", "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--save_steps", "1",
         "--logging_steps", "1", "--per_device_train_batch_size", "1", "--seed", "1", "--learning_rate", "1e-3",
         "--report_to", "none", "--dataloader_num_workers", "0", "--latent_data_path", str(tmp_path / "latents" / "latents.csv"),
         "--model_config", str(tmp_path / "stdit3.json"), "--vae_path", vae_dir, "--text_encoder_path", tiny_models["text_encoder"],
         "--sampler", "rflow", "--rflow_use_timestep_transform", "true", "--freeze", "not_temporal",
         "--mask_ratios", '{"mask_no": 0.5, "mask_image_head": 0.5}'],
        launcher=("-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir)), env=env)
    log = (log_dir / "workerlog.0").read_text()
    assert "weights identical on all 2 ranks" in log
    trained = json.load(open(tmp_path / "out" / "config.json"))
    assert trained["model_type"] == "STDiT3" and trained["only_train_temporal"] is True
    # --freeze not_temporal: from the first checkpoint to the end only the temporal blocks moved
    before, after = weights(tmp_path / "out" / "checkpoint-1"), weights(tmp_path / "out")
    moved = {name for name in after if not np.array_equal(after[name], before[name])}
    assert moved and all(name.startswith("temporal_blocks.") for name in moved)
