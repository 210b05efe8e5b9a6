#!/usr/bin/env bash
# The GPU checks of issue 12, prepared to run in one short call on a lent CUDA machine:
#   bash bench/gpu_check.sh check   # GPU tests, self-check cost, a phantom training + prediction,
#                                   # the block table (fused vs eager vs fast vs smp)
#   bash bench/gpu_check.sh models  # the training-step table (eager vs fused vs smp's scSE)
#   bash bench/gpu_check.sh suite   # the whole test suite with a GPU visible
# Results go under $OUT (default /tmp/gpu_out): log.txt and results-<what>.tgz. Wheels in .whl/
# (segmentation-models-pytorch, monai, ... missing on the machine) are installed to /tmp/site.
# Each stage has its own time limit, so a slow one cannot eat the others' time; the CSVs are
# rewritten after every row, so a stage cut short keeps what it measured.
set -u
what=${1:-check}
OUT=${OUT:-/tmp/gpu_out}
R=$OUT/r-$what
mkdir -p "$R"
exec > >(tee -a "$OUT/log-$what.txt") 2>&1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

stage() {
  local name=$1 lim=$2 s rc
  shift 2
  echo "=== $name (limit ${lim}s) $(date +%T)"
  s=$(date +%s)
  timeout "$lim" "$@"
  rc=$?
  echo "=== $name rc=$rc in $(($(date +%s) - s))s"
}

case $what in
check)
  stage gpu-tests 120 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider -rs
  stage selfcheck 75 python3 bench/bench_selfcheck.py --device cuda --out "$R/selfcheck"
  stage train 75 python3 train_seg.py --attn scse --device cuda --epochs 2 --no-progress \
    --out "$R/run-scse" data.phantom_dir="$R/phantom"
  stage predict 40 python3 eval/predict.py "$R/run-scse" "$R/phantom/imagesTr" "$R/pred" --device cuda
  rm -rf "$R/phantom" "$R/pred"
  stage blocks 150 python3 bench/run.py blocks --device cuda --dtype bf16 fp32 \
    --layout nchw channels_last --out "$R/blocks"
  ;;
models)
  # FC-DenseNet at batch 16 x 256^2 runs out of 80 GB with its three interleaved variants
  stage models 240 python3 bench/run.py models --device cuda --dtype bf16 fp32 \
    --layout nchw channels_last --archs unet sdnet --attentions none scse \
    --warmup 3 --iters 8 --out "$R/models"
  stage models-densenet 120 python3 bench/run.py models --device cuda --dtype bf16 fp32 \
    --layout nchw --archs densenet --attentions none scse --no-anchor --batch 8 \
    --warmup 3 --iters 8 --out "$R/models-densenet"
  ;;
profile)
  stage gpu-tests 80 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider
  stage profile 30 python3 bench/profile_fused.py --mode scse_max
  stage models 70 python3 bench/run.py models --device cuda --dtype bf16 fp32 --layout nchw \
    --archs unet densenet sdnet --attentions none scse --batch 8 --warmup 3 --iters 8 \
    --no-anchor --out "$R/models"
  ;;
suite)
  stage suite 420 python3 -m pytest -q -x -n 8 -p no:cacheprovider
  ;;
esac
rm -rf "$R"/run-*/*.pt
tar czf "$OUT/results-$what.tgz" -C "$R" .
ls -la "$OUT"
