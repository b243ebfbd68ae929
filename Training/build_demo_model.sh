#!/usr/bin/env bash
# Rebuilds the embedded demo model (CCELLACore/demo_model) from nothing but this repository, exactly as shipped:
# the phantom world -> preprocessing -> autoencoder -> diffusion model -> report-faithfulness figures.
# About an hour on 2 CPU cores (AVX-512); minutes on a GPU (add --device cuda to the training jobs).
# Usage: bash Training/build_demo_model.sh [WORK_DIR]   (run from the repository root with the venv's ccella on PATH)
set -euo pipefail
work=${1:-demo_build}
ccella phantoms --institution 1 --n 600 --seed 0 --out "$work/phantoms" --layouts none
ccella preprocess --manifest "$work/phantoms/manifest.csv" --config demo --target ldm --out "$work/prep" --workers 2
ccella train-autoencoder --config demo --manifest "$work/prep/manifest.csv" --out "$work/ae_run"
ccella train-ldm --config demo --manifest "$work/prep/manifest.csv" --autoencoder "$work/ae_run/model" --out "$work/ldm_run"
# Figures on 50 reports of phantom seed 1000 (never used in training); they go into the model card.
ccella honour --model "$work/ldm_run/model" --n 50 --seed 1000 --sampler ddpm --steps 100 --out "$work/honour" --update-card
rm -rf CCELLACore/demo_model && cp -r "$work/ldm_run/model" CCELLACore/demo_model
