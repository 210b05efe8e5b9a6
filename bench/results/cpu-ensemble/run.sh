# Ensemble prediction: seconds per volume and peak memory (max RSS) for 1 vs 5 runs. Needs the
# hippocampus grid of eval/results/hippocampus_cv_test_cpu/run.sh (/tmp/hcv, /tmp/hsplit).
set -e
cd "$(dirname "$0")/../../.."
# LPBA40: one short run (its weights do not matter for time and memory), copied to 5 members
python train_seg.py --config configs/lpba40.yaml --arch unet --out /tmp/lp/r1 --epochs 1 \
  model.width=16 model.reduction=2 model.fusion=max train.max_steps_per_epoch=2 train.batch_size=4 --no-progress
for i in 2 3 4 5; do cp -r /tmp/lp/r1 /tmp/lp/r$i; done
S=../shared/data/LPBA40/imagesTr/lpba40_01.nii.gz
for k in 1 5; do
  runs=$(for i in $(seq 1 $k); do echo -n "/tmp/lp/r$i "; done)
  /usr/bin/time -f "LPBA40 k=$k maxrss_kb=%M wall_s=%e" python eval/predict.py $runs $S /tmp/lp/out$k \
     --save-probabilities --no-progress
done
# hippocampus: the 4 fold runs of the grid + a copy of one = 5 members, 65 test volumes
H=/tmp/hcv/runs
cp -r $H/unet-none-f0-s0 /tmp/h5
for k in 1 5; do
  if [ $k = 1 ]; then runs="$H/unet-none-f0-s0"; else runs="$H/unet-none-f0-s0 $H/unet-none-f1-s0 $H/unet-scse-f0-s0 $H/unet-scse-f1-s0 /tmp/h5"; fi
  /usr/bin/time -f "hippocampus k=$k maxrss_kb=%M wall_s=%e" python eval/predict.py $runs /tmp/hsplit/B/imagesTr \
     /tmp/hout$k --save-probabilities --no-progress --no-postprocessing
done
