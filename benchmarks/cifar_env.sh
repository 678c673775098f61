# Sourced by fidelity_cifar.sh and results_cifar.sh (which set RUNS's default
# first): the environment's defaults, and the CIFAR-10 archives extracted
# once into DATA.
OFFICIAL=${OFFICIAL:-.official}
DATA=${DATA:-/tmp/data}
RUNS=${RUNS:?set RUNS before sourcing cifar_env.sh}
LOGS=${LOGS:-$RUNS}
PYTHON=${PYTHON:-python3}
mkdir -p "$RUNS" "$LOGS" "$DATA"
for split in train test; do
  [ -d "$DATA/cifar10/$split" ] || tar xzf "$OFFICIAL/cifar10_$split.tar.gz" -C "$DATA"
done
