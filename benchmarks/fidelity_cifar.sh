#!/usr/bin/env bash
# Issue 11's CIFAR-10 runs on one GPU machine, stage by stage (each stage fits
# one 10-minute device call; run them on one warm machine, in this order).
#
#   bash benchmarks/fidelity_cifar.sh official        # the official code, 10 epochs
#   bash benchmarks/fidelity_cifar.sh ours SEED [STEPS [FLAGS...]]  # this project
#   bash benchmarks/fidelity_cifar.sh evaluate NAME=PATH ... [FLAGS...]  # both protocols
#
# "ours" trains configs/cifar10.py with the official harness's budget:
# STEPS steps (1,953 = 10 epochs of batch 256 by default), warm-up STEPS/10
# (the harness's 1 epoch in 10); FLAGS go to train.py as they are (say
# --config.loss=ce_last_step), and TAG, when set, names the work directory
# ours_${TAG}_s${SEED}_${STEPS} apart from the default runs (for "evaluate",
# TAG.json and TAG.log instead of fidelity.*). Environment: OFFICIAL (a copy of
# ../shared/official with cifar10_{train,test}.tar.gz beside it, default
# .official), DATA (default /tmp/data), RUNS (default /tmp/fid), LOGS (where
# logs and the JSON go, default RUNS), PYTHON (default python3).
set -euo pipefail
RUNS=${RUNS:-/tmp/fid}
source "$(dirname "$0")/cifar_env.sh"

stage=${1:?usage: fidelity_cifar.sh official | ours SEED [STEPS [FLAGS...]] | evaluate NAME=PATH ... [FLAGS...]}
shift
start=$(date +%s)
case "$stage" in
  official)
    PYTHONPATH="$OFFICIAL" "$PYTHON" -u "$OFFICIAL/cifar_official.py" "$DATA" 1953 195 \
      "$RUNS/official.pt" 2>&1 | tee "$LOGS/official_train.log"
    ;;
  ours)
    seed=${1:?seed}
    steps=${2:-1953}
    shift $(( $# < 2 ? $# : 2 ))
    name="ours_${TAG:+${TAG}_}s${seed}_${steps}"
    "$PYTHON" -u train.py --config "configs/cifar10.py:$DATA" --workdir "$RUNS/$name" \
      --config.seed="$seed" --config.num_train_steps="$steps" \
      --config.optim.warmup_steps=$(( steps / 10 )) "$@" \
      2>&1 | grep --line-buffered -v "absl" | tee "$LOGS/$name.log"
    ;;
  evaluate)
    models=()
    for spec in "$@"; do
      case "$spec" in
        --*) models+=("$spec") ;;  # a flag of fidelity_cifar.py, say --protocols=random
        *) models+=(--model "$spec") ;;
      esac
    done
    "$PYTHON" -u benchmarks/fidelity_cifar.py --data "$DATA" --official-src "$OFFICIAL" \
      "${models[@]}" --output "$LOGS/${TAG:-fidelity}.json" 2>&1 | grep --line-buffered -v "absl" \
      | tee "$LOGS/${TAG:-fidelity}.log"
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
echo "stage $stage $* wall $(( $(date +%s) - start )) s"
