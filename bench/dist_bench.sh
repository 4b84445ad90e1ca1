#!/bin/bash
# make bench-dist: configs/small.ini for a few steps in one process and under
# `mpirun -np 2` (data parallel; with ZeRO-1; expert parallel, EP = 2) and `mpirun -np 4`
# (EP = 2 x DP = 2): training tokens/s,
# and for the MPI runs the bytes rank 0 hands to MPI per step and the share of training
# time it spends inside collectives (waiting for the other rank included). Every run gets the
# same cores: one process all of them, each rank its share. Not a test; on a machine
# shared with other work the figures are indicative only.
set -euo pipefail
MOE=${1:-./moe}
STEPS=${STEPS:-5}
CORES=$(nproc)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ARGS=(train configs/small.ini "train.steps=$STEPS" train.eval_every=0 train.sample_tokens=0
      "train.out_dir=$OUT")
"$MOE" prepare >/dev/null

report() {   # name, log
    local tok comm
    tok=$(grep -ao '([0-9]* tok/s training' "$2" | grep -o '[0-9]*' | head -1)
    comm=$(grep -a '^communication' "$2" | sed 's/^communication (rank 0): //' || true)
    printf '%-24s %8s tok/s  %s\n' "$1" "$tok" "${comm:-no communication}"
}

OMP_NUM_THREADS=$CORES "$MOE" "${ARGS[@]}" train.name=p1 >"$OUT/p1.log" 2>&1
report "1 process" "$OUT/p1.log"
PER=$(( CORES / 2 > 0 ? CORES / 2 : 1 ))
mpirun --oversubscribe -np 2 -x OMP_NUM_THREADS=$PER "$MOE" "${ARGS[@]}" train.name=dp2 \
    >"$OUT/dp2.log" 2>&1
report "mpirun -np 2 (DP)" "$OUT/dp2.log"
mpirun --oversubscribe -np 2 -x OMP_NUM_THREADS=$PER "$MOE" "${ARGS[@]}" dist.zero=1 \
    train.name=zero2 >"$OUT/zero2.log" 2>&1
report "mpirun -np 2 (ZeRO-1)" "$OUT/zero2.log"
mpirun --oversubscribe -np 2 -x OMP_NUM_THREADS=$PER "$MOE" "${ARGS[@]}" \
    dist.expert_parallel=2 train.name=ep2 >"$OUT/ep2.log" 2>&1
report "mpirun -np 2 (EP=2)" "$OUT/ep2.log"
PER4=$(( CORES / 4 > 0 ? CORES / 4 : 1 ))
mpirun --oversubscribe -np 4 -x OMP_NUM_THREADS=$PER4 "$MOE" "${ARGS[@]}" train.grad_accum=4 \
    dist.expert_parallel=2 train.name=ep2dp2 >"$OUT/ep2dp2.log" 2>&1
report "mpirun -np 4 (EP=2xDP=2)" "$OUT/ep2dp2.log"
