#!/usr/bin/env bash
# Rebuild the shipped demo model (assets/default_model) from nothing, on CPU.
#   bash toy_world/train_default_model.sh [DATA_DIR]
# DATA_DIR (default: data/synthetic) receives the rendered toy videos; it is not part of the repo.
# MODEL_DIR (default: assets/default_model) and RESULTS_DIR (default: assets/results) receive the model (a pipeline
# directory) and the evaluation strips; point them elsewhere to build a candidate without touching the shipped model.
# PARTS_DIR (default: runs/default_model_parts) holds the text encoder and VAE while the STDiT2 trains.
# START_STEP=N skips the steps before N. An interrupted STDiT2 cycle resumes from its newest checkpoint in
# RUN_DIR when rerun from its step (START_STEP=5 for the first cycle, 6 for the second); step 4 encodes new
# latents and so deletes RUN_DIR, whose checkpoints were trained on the old ones.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python}"
data_dir="${1:-data/synthetic}"
model_dir="${MODEL_DIR:-assets/default_model}"
results_dir="${RESULTS_DIR:-assets/results}"
run_dir="${RUN_DIR:-runs/default_stdit2}"
parts_dir="${PARTS_DIR:-runs/default_model_parts}"
start_step="${START_STEP:-1}"

# step N TITLE: true when step N should run; prints the step's title and the time since the script started.
step() {
    if (( start_step > $1 )); then return 1; fi
    echo "== step $1 (${SECONDS}s since start): $2"
}

# 1. Toy data set: 2000 training clips, captioned the ways people write, + the held-out combinations (~20 s).
step 1 "toy data set" && "$python" toy_world/make_synthetic_data.py --output-dir "$data_dir" --num-clips 2000 --seed 0

# 2. Tokenizer trained on the captions + small random-init T5 encoder (seconds).
step 2 "text encoder" && "$python" toy_world/make_text_encoder.py --output-dir "$parts_dir/text_encoder" --seed 0

# 3. Image VAE (4x down: 64x64 frames -> 16x16x4 latents, which keep the edges of 14-20 px objects) on the frames
#    of the training clips and as many random colour frames (train_vae.py says why).
step 3 "VAE" && "$python" toy_world/train_vae.py --data-dir "$data_dir" --output-dir "$parts_dir/vae" --seed 0 \
    --steps 2000 --block-out-channels 16 32 48 --colour-fraction 0.5 --lowpass-weight 1.0

# 4-6. STDiT2 with the real training script, in two cosine cycles: the second restarts from the first one's EMA
#    weights at half the peak learning rate; its final (not EMA) weights are shipped, which followed the
#    prompted direction more often than its EMA (README). The VAE is frozen and every clip is used whole,
#    so the clips are encoded once (posterior mean and std) instead of at every step; each step still draws a
#    fresh latent. Rectified flow with the v1.2 timestep shift (x3 at 64x64x16: scale 6 times the base 0.5), so
#    more steps train the high noise levels where a clip's layout and motion are decided; v1.1 frame masks with
#    more conditioning (image/connect/extend/edit). Patches of 1x4x4 latents (configs/stdit2/demo.json) keep 16
#    tokens per frame on the 4x VAE's 16x16 latents.
stdit2_recipe=(
    --latent_data_path "$data_dir/latents/latents.csv" --vae_path "$parts_dir/vae"
    --text_encoder_path "$parts_dir/text_encoder" --sampler rflow
    --rflow_sample_method logit-normal --rflow_use_timestep_transform true --rflow_transform_scale 6.0
    --per_device_train_batch_size 16 --lr_scheduler_type cosine --weight_decay 0.0 --max_grad_norm 1.0
    --save_steps 400 --save_total_limit 2 --logging_steps 50 --dataloader_num_workers 0 --report_to none
    --ema_decay 0.999 --inference_cfg_scale 4.0
    --mask_ratios '{"mask_no": 0.7, "mask_quarter_random": 0.03, "mask_quarter_head": 0.06, "mask_quarter_tail": 0.03, "mask_quarter_head_tail": 0.03, "mask_image_random": 0.03, "mask_image_head": 0.06, "mask_image_tail": 0.03, "mask_image_head_tail": 0.03}'
)
if step 4 "latents"; then
    "$python" scripts/encode_latents.py --data-path "$data_dir/train.csv" --vae-path "$parts_dir/vae" \
        --num-frames 16 --image-size 64 64 --output-dir "$data_dir/latents" --batch-size 16
    rm -rf "$run_dir"
fi
# No --overwrite_output_dir: rerun, a cycle resumes from its newest complete checkpoint.
step 5 "STDiT2, first cycle" && "$python" scripts/trainer_opensora.py --do_train --output_dir "$run_dir/cycle1" \
    --model_config configs/stdit2/demo.json "${stdit2_recipe[@]}" \
    --learning_rate 8e-4 --warmup_steps 150 --max_steps 2000 --seed 42
step 6 "STDiT2, second cycle" && "$python" scripts/trainer_opensora.py --do_train --output_dir "$run_dir/cycle2" \
    --pretrained_model_path "$run_dir/cycle1/ema" "${stdit2_recipe[@]}" \
    --learning_rate 4e-4 --warmup_steps 100 --max_steps 2000 --seed 43

# 7. Ship the second cycle's weights as a pipeline directory, with the sampling settings they were trained for
#    (its inference.json), and measure them. README.md and evaluation.json of MODEL_DIR are kept.
if step 7 "ship and evaluate"; then
    "$python" scripts/save_pipeline.py --model-path "$run_dir/cycle2" --vae-path "$parts_dir/vae" \
        --text-encoder-path "$parts_dir/text_encoder" --output-dir "$run_dir/pipeline"
    cp "$parts_dir/vae/training_report.json" "$run_dir/pipeline/vae/"
    mkdir -p "$model_dir"
    for part in model_index.json transformer vae text_encoder tokenizer scheduler; do
        rm -rf "${model_dir:?}/$part"
        cp -r "$run_dir/pipeline/$part" "$model_dir/"
    done
    "$python" toy_world/evaluate.py --num-prompts 48 --model-dir "$model_dir" \
        --output "$model_dir/evaluation.json" --strips-dir "$results_dir"
fi
echo "== done in ${SECONDS}s"
