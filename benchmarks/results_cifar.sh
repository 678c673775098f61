#!/usr/bin/env bash
# Issue 12's CIFAR-10 results on one GPU machine, stage by stage (each stage
# fits one 10-minute device call; docs/RESULTS.md quotes what they print).
#
#   bash benchmarks/results_cifar.sh recipe     # configs/cifar10.py as it is (~345 s on an H100)
#   bash benchmarks/results_cifar.sh light      # configs/cifar10_light.py (~321 s), then its 2,000-image table
#   bash benchmarks/results_cifar.sh canvas128  # configs/cifar10_canvas128.py, the best recipe (~515 s)
#   bash benchmarks/results_cifar.sh grid       # its model: 7 canvases x 4 scans x T to 1024 (~80 s)
#   bash benchmarks/results_cifar.sh ablation   # the loss ablation at the 10-epoch budget, seed 0
#   bash benchmarks/results_cifar.sh mambaout   # configs/cifar10_mambaout.py: train, then every canvas
#   bash benchmarks/results_cifar.sh datawait   # configs/cifar10.py's data wait, ship=patches, canvas, source
#
# Environment as benchmarks/fidelity_cifar.sh: OFFICIAL (where the CIFAR
# archives are, default .official), DATA (default /tmp/data), RUNS (default
# /tmp/results), LOGS (logs and eval outputs, default RUNS), PYTHON. For
# "grid": MODEL, a model directory to score instead of the canvas128 stage's
# work directory, and EVAL_FLAGS, more eval.py flags (say "--max-examples 500
# --glimpses 16,64,256" for a look on a CPU).
set -euo pipefail
RUNS=${RUNS:-/tmp/results}
source "$(dirname "$0")/cifar_env.sh"
WORKERS=${WORKERS:-$(( $(nproc) - 1 ))}
quiet() { grep --line-buffered -v -E "absl|^[IW][0-9]{4} "; }

stage=${1:?usage: results_cifar.sh recipe | light | canvas128 | grid | ablation | mambaout | datawait}
start=$(date +%s)
case "$stage" in
  recipe)
    "$PYTHON" -u train.py --config "configs/cifar10.py:$DATA" --workdir "$RUNS/cifar10" \
      2>&1 | quiet | tee "$LOGS/recipe.log"
    ;;
  light)
    "$PYTHON" -u train.py --config "configs/cifar10_light.py:$DATA" --workdir "$RUNS/cifar10_light" \
      2>&1 | quiet | tee "$LOGS/light.log"
    "$PYTHON" -u eval.py --checkpoint "$RUNS/cifar10_light/model" --data "$DATA/cifar10/test" \
      --canvas-sizes 32,64,128,256 --glimpses 16,64,128,256 --max-examples 2000 \
      --workers "$WORKERS" --output "$LOGS/light_eval" --no-plots 2>&1 | quiet | tail -14
    ;;
  canvas128)
    "$PYTHON" -u train.py --config "configs/cifar10_canvas128.py:$DATA" \
      --workdir "$RUNS/cifar10_canvas128" 2>&1 | quiet | tee "$LOGS/canvas128.log"
    "$PYTHON" benchmarks/data_wait.py "canvas128=$RUNS/cifar10_canvas128" --from_step 500 \
      | tee "$LOGS/canvas128_datawait.md"
    ;;
  grid)
    if [ -n "${MODEL:-}" ]; then model=(--checkpoint "$MODEL"); else
      model=(--workdir "$RUNS/cifar10_canvas128"); fi
    # shellcheck disable=SC2086  # EVAL_FLAGS is a list of flags.
    "$PYTHON" -u eval.py "${model[@]}" --data "$DATA/cifar10/test" \
      --canvas-sizes 32,48,64,96,128,192,256 --scan random,horizontal_raster,spiral,hilbert \
      --glimpses 16,32,64,128,256,512,1024 --workers "$WORKERS" --batch-size 250 \
      --output "$LOGS/grid" ${EVAL_FLAGS:-} 2>&1 | quiet | tee "$LOGS/grid.log"
    ;;
  ablation)
    for loss in stepwise ce_last_step ce_every_step; do
      TAG=$loss RUNS=$RUNS LOGS=$LOGS bash benchmarks/fidelity_cifar.sh ours 0 1953 \
        --config.loss=$loss
      "$PYTHON" -u eval.py --workdir "$RUNS/ours_${loss}_s0_1953" --data "$DATA/cifar10/test" \
        --canvas-sizes 32,64 --glimpses 1,2,4,8,16,32,64,128 --workers "$WORKERS" \
        --batch-size 500 --output "$LOGS/loss_$loss" --no-plots 2>&1 | quiet | tail -3
    done
    "$PYTHON" benchmarks/compare_runs.py "step-wise=$LOGS/loss_stepwise" \
      "ce-last=$LOGS/loss_ce_last_step" "ce-every=$LOGS/loss_ce_every_step" \
      --plot "$LOGS/loss_ablation.png" | tee "$LOGS/loss_ablation.md"
    ;;
  mambaout)
    "$PYTHON" -u -m mambaeye_jax.mambaout_train --config "configs/cifar10_mambaout.py:$DATA" \
      --workdir "$RUNS/mambaout" 2>&1 | quiet | tee "$LOGS/mambaout.log"
    ;;
  datawait)
    # 1,500 steps each (about 2 minutes with the decoded-image cache); the
    # table averages the log windows after step 500.
    for ship in patches canvas source; do
      "$PYTHON" -u train.py --config "configs/cifar10.py:$DATA" --workdir "$RUNS/datawait_$ship" \
        --config.num_train_steps=1500 --config.data.ship=$ship 2>&1 | quiet | grep -E "^step" \
        | tail -3 | tee "$LOGS/datawait_$ship.log"
    done
    "$PYTHON" benchmarks/data_wait.py "patches=$RUNS/datawait_patches" \
      "canvas=$RUNS/datawait_canvas" "source=$RUNS/datawait_source" --from_step 500 \
      | tee "$LOGS/datawait.md"
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
echo "stage $stage wall $(( $(date +%s) - start )) s"
