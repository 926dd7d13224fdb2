#!/usr/bin/env bash
# The one prepared GPU check (run through the lent-GPU tool; see docs/gpu.md). Arguments: which parts to run.
# Needs monai/nibabel/pydicom wheels in .whl/ when the GPU image lacks them, and the PneumoniaMNIST .npz in .gpu_data/.
set -u
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ! python3 -c "import monai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
for part in "$@"; do
  case $part in
    tests) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_views.py 2>&1 | tee "$OUT/tests.txt" ;;
    throughput) timeout 360 python3 benchmarks/throughput.py --warmup 3 --steps 10 2>&1 | tee "$OUT/throughput.txt" ;;
    demo) timeout 60 python3 -m medcl --quiet demo --out /tmp/demo_gpu --overwrite 2>&1 | tail -4 | tee "$OUT/demo.txt" ;;
    methods) timeout 200 python3 benchmarks/methods.py --data .gpu_data/pneumoniamnist_reconstructed.npz --epochs 20 --methods ${METHODS:-simclr supcon pair triplet moco_v2 moco_v3 byol simsiam barlow vicreg} 2>&1 | tee "$OUT/methods.txt" ;;
    fewlabel) timeout 240 python3 benchmarks/few_label.py --data .gpu_data/pneumoniamnist_reconstructed.npz \
                --out /tmp/bench_pm --overwrite --epochs 100 --seeds 5 2>&1 | tee "$OUT/few_label.txt" ;;
    default) # the GPU default budget (no flags: 4M views) on PneumoniaMNIST, then evaluated against both controls
      PM=.gpu_data/pneumoniamnist_reconstructed.npz
      timeout 420 python3 -m medcl pretrain $PM --out /tmp/pm_gpu --overwrite 2>&1 | tail -30 | tee "$OUT/default.txt"
      timeout 150 python3 -m medcl --quiet evaluate --checkpoint /tmp/pm_gpu --data $PM --out /tmp/pm_gpu_eval \
        --overwrite --seeds 3 --fractions 0.01 --per-class 10 --heads knn linear proto spread selftrain finetune \
        2>&1 | tail -40 | tee -a "$OUT/default.txt"
      cp /tmp/pm_gpu_eval/protocol.json /tmp/pm_gpu/loss.csv "$OUT/" 2>/dev/null ;;
  esac
done
