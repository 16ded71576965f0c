"""Pre-encoded training data: the VAE posterior of each clip, computed once by `scripts/encode_latents.py`.

The VAE is frozen during STDiT2 training, so when every clip is used whole (no random start or crop)
encoding it at every step repeats the same computation; on a CPU it costs more than the STDiT2 step itself.
Storing the posterior mean and standard deviation keeps training exactly equivalent: each step still draws
a fresh latent sample `mean + std * noise`, as on-the-fly encoding does.

Latent CSV columns: `latent_path,text,num_frames,height,width,fps,aspect_ratio`; each latent file is an
.npz with float16 arrays `mean` and `std` of shape [C, T, h, w] (unscaled, before the VAE scaling factor).
"""

import csv
import os

import numpy as np
import paddle

from utils.errors import UserError

LATENT_COLUMNS = ("latent_path", "text", "num_frames", "height", "width", "fps", "aspect_ratio")
SIZE_KEYS = ("num_frames", "height", "width", "ar", "fps")


class LatentTextDataset(paddle.io.Dataset):
    def __init__(self, csv_path, max_samples=None):
        if not os.path.isfile(csv_path):
            raise UserError(f"{csv_path}: latent CSV not found; write one with scripts/encode_latents.py")
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [column for column in LATENT_COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{csv_path}: missing columns {missing}; it must come from scripts/encode_latents.py")
            rows = list(reader)[:max_samples]
        if not rows:
            raise UserError(f"{csv_path}: no rows")
        base = os.path.dirname(os.path.abspath(csv_path))
        self.rows = []
        for number, row in enumerate(rows, start=2):
            path = os.path.join(base, row["latent_path"])
            if not os.path.isfile(path):
                raise UserError(f"{csv_path} line {number}: latent file {row['latent_path']} not found; re-run scripts/encode_latents.py")
            try:
                sizes = {key: float(row[column]) for key, column in zip(SIZE_KEYS, ("num_frames", "height", "width", "aspect_ratio", "fps"))}
            except ValueError:
                raise UserError(f"{csv_path} line {number}: num_frames/height/width/fps/aspect_ratio must be numbers") from None
            self.rows.append(dict(path=path, text=row["text"], **sizes))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[index]
        with np.load(row["path"]) as latent:
            mean, std = latent["mean"].astype("float32"), latent["std"].astype("float32")
        return dict(latent_mean=mean, latent_std=std, text=row["text"], num_skipped=0, **{k: row[k] for k in SIZE_KEYS})


def collate_latents(samples):
    batch = {key: np.stack([s[key] for s in samples]) for key in ("latent_mean", "latent_std")}
    batch.update({key: np.asarray([s[key] for s in samples], dtype="float32") for key in SIZE_KEYS})
    batch["text"] = [s["text"] for s in samples]
    batch["num_skipped"] = np.asarray([s["num_skipped"] for s in samples], dtype="int64")
    return batch


@paddle.no_grad()
def encode_dataset(dataset, vae, output_dir, csv_path, batch_size=4, progress=True):
    """Encode every clip of a video dataset (whole clips, deterministic transform) and write the latent CSV."""
    from tqdm import tqdm

    from utils.io import atomic_path

    os.makedirs(os.path.join(output_dir, "latents"), exist_ok=True)
    rows = []
    for start in tqdm(range(0, len(dataset), batch_size), disable=not progress, desc="encoding"):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        video = paddle.to_tensor(np.stack([s["video"] for s in samples]))
        posterior = vae.posterior(video)
        means, stds = posterior
        for offset, sample in enumerate(samples):
            name = os.path.join("latents", f"{start + offset:07d}.npz")
            with atomic_path(os.path.join(output_dir, name)) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, mean=means[offset].numpy().astype("float16"), std=stds[offset].numpy().astype("float16"))
            rows.append(dict(latent_path=name, text=sample["text"], num_frames=int(sample["num_frames"]),
                             height=int(sample["height"]), width=int(sample["width"]), fps=float(sample["fps"]),
                             aspect_ratio=float(sample["ar"])))
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=LATENT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return csv_path
