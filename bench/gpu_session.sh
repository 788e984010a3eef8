#!/usr/bin/env bash
# One short GPU session (the device tool's H100 / H200): the GPU figures of two issues in one
# prepared run that fits a 10-minute call, every phase under its own time limit.
#
#   #18  bench/t2i.py: the t2i_canvas preset at a larger width (U-Net 96 channels, autoencoder
#        32), both stages trained in minutes, images/s, MFU and the adherence table
#   #21  bench/likelihood.py: the ODE bits/dim of the CPU-trained fashion_mnist preset on the
#        full 10,000-image test set with its standard error; then the four likelihood models
#        (cosine / cosine VLB / learned VLB / hybrid) trained with one budget on the GPU, each
#        with its VLB on 10,000 test images and its ODE bits/dim on as many as ~20 s allow
#
# Needs, under .gpu/ (ignored by git, carried by the device tool): fmnist/ (the four IDX .gz
# files), minilm_canvas.safetensors (python bench/t2i.py --precompute FILE), fm_base/checkpoint
# (a trained fashion_mnist run, the EMA weights suffice). Results: $OUT/t2i_gpu.json,
# $OUT/t2i_grid_gpu.png, $OUT/likelihood_gpu.json, $OUT/session.log.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1 DIFFLAB_FASHION_MNIST="$PWD/.gpu/fmnist"
LOG="$OUT/session.log"
T0=$(date +%s)
left() { local s=$(( ${1} - ($(date +%s) - T0) )); echo $(( s > 1 ? s : 1 )); }
{ nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } >>"$LOG" 2>&1

echo "== t2i $(date -u +%T)" >>"$LOG"
timeout "$(left 300)" python3 bench/t2i.py --device cuda --threads 8 --out /tmp/t2i_gpu \
    --max-minutes 3.1 --ae-minutes 1.2 --precomputed .gpu/minilm_canvas.safetensors \
    --set net.model_channels=96 --set autoencoder.net.base_channels=32 \
    --set autoencoder.train.batch_size=64 --set train.batch_size=256 \
    --json "$OUT/t2i_gpu.json" --grid "$OUT/t2i_grid_gpu.png" --log-every 500 >>"$LOG" 2>&1
echo "t2i rc $? at $(( $(date +%s) - T0 )) s" >>"$LOG"

echo "== likelihood $(date -u +%T)" >>"$LOG"
timeout "$(left 400)" python3 bench/likelihood.py --device cuda --threads 8 \
    --preset .gpu/fm_base --preset-count 10000 --ode-batch 1000 --rtol 1e-3 \
    --ode-seconds 70 --out /tmp/lk_gpu >>"$LOG" 2>&1
echo "preset rc $? at $(( $(date +%s) - T0 )) s" >>"$LOG"
timeout "$(left 585)" python3 bench/likelihood.py --device cuda --threads 8 --steps 600 \
    --batch-size 256 --ode-count 4000 --vlb-count 10000 --fid-count 1000 --ode-batch 500 \
    --rtol 1e-3 --ode-seconds 18 --out /tmp/lk_gpu >>"$LOG" 2>&1
echo "models rc $? at $(( $(date +%s) - T0 )) s" >>"$LOG"
python3 - "$OUT/likelihood_gpu.json" <<'EOF' >>"$LOG" 2>&1
import json, pathlib, sys
out = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path("/tmp/lk_gpu").glob("*.json"))}
pathlib.Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
print("merged", sorted(out))
EOF
echo "done at $(( $(date +%s) - T0 )) s" >>"$LOG"
