#!/usr/bin/env bash
# Rebuild the shipped demo model (assets/default_model) from nothing, on CPU.
#   bash scripts/train_default_model.sh [DATA_DIR]
# DATA_DIR (default: data/synthetic) receives the rendered toy videos; it is not part of the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python}"
data_dir="${1:-data/synthetic}"
model_dir="assets/default_model"

# 1. Toy data set: 2000 captioned training clips + the held-out combinations (~15 s).
"$python" scripts/make_synthetic_data.py --output-dir "$data_dir" --num-clips 2000 --seed 0

# 2. Tokenizer trained on the captions + small random-init T5 encoder (seconds).
"$python" scripts/make_text_encoder.py --output-dir "$model_dir/text_encoder" --seed 0

# 3. Image VAE on the frames of the training clips (~20 min on 2 CPU cores).
"$python" scripts/train_vae.py --data-dir "$data_dir" --output-dir "$model_dir/vae" --seed 0

# 4. STDiT2 on the VAE latents and T5 caption embeddings.
# PLACEHOLDER (lead): add the scripts/trainer_opensora.py command that writes "$model_dir/stdit2".
