#!/bin/bash
# Train on 195 cases of Task04_Hippocampus (2-fold CV), test on the other 65 (every 4th listed
# case, sorted), choose the postprocessing on the held-out folds. ~12 min on a 2-core CPU.
set -e
python eval/results/hippocampus_cv_test_cpu/make_split.py ../shared/data/Task04_Hippocampus /tmp/hsplit
python eval/compare.py --data /tmp/hsplit/A --test /tmp/hsplit/B --archs unet --attns none,scse \
  --folds 2 --seeds 1 --epochs 3 --surface --out /tmp/hcv --no-progress model.width=16 \
  model.reduction=2 model.fusion=max  # the TMI 2019 setting these results used (not the default)
python eval/postprocess.py /tmp/hcv/runs/unet-none-f0-s0 /tmp/hcv/runs/unet-none-f1-s0 --no-progress
