#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU, CUDA 13, python3 with
# PyTorch, transformers, h5py and pytest, and none of Debian's packages (the workplace's
# device machine). Prepare here with `make gpu-bundle`, then run there from the repo root
# carrying .gpu, e.g. with the device tool:
#     run(command="bash tests/cuda/gpu_check.sh", carry=[".gpu"], timeout_s=600)
# Every step has its own time limit and writes its output to $OUT (default ./gpu-out);
# a failing step does not stop the next. Steps, cheapest first:
#   cuda_ops.txt     every CUDA op against the CPU op (build/tests/cuda_ops)
#   cuda_train.txt   tests/cuda/test_cuda_train.py: fp32 / bf16 loss sequences against the
#                    CPU, resume bit for bit, freezing
#   nccl.txt         tests/cuda/test_nccl_train.py: mpirun -np 1 (the bundle's Open MPI)
#                    with NCCL equals the run without MPI, bit for bit (with 2 or 4
#                    GPUs also expert parallelism against one GPU; skipped on one)
#   hf.txt           transformers' MixtralForCausalLM on a `moe export` against moe's logits
#   bench-gpu.txt    build/bench --gpu (GEMM peak, expert GEMMs, gpu-medium training);
#                    bench-gpu.csv
#   peer.txt         build/bench --gpu-peer (PyTorch eager and torch.compile)
# The limits add up to 10 minutes, one device call's limit: name steps to run only those,
# e.g. `bash tests/cuda/gpu_check.sh nccl cuda_ops`.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT" /tmp/moe-gpu
[ -f .gpu/bundle.tar.xz ] || { echo "gpu_check: no .gpu/bundle.tar.xz (make gpu-bundle, then carry .gpu)"; exit 2; }
tar -C /tmp/moe-gpu -xJf .gpu/bundle.tar.xz
cp /tmp/moe-gpu/moe ./moe
mkdir -p build/tests
cp /tmp/moe-gpu/build/tests/cuda_ops build/tests/cuda_ops
cp /tmp/moe-gpu/build/bench build/bench
# The binaries look in /usr/local/cuda/lib64 for libcudart and libcublas; elsewhere, say where.
if [ ! -e /usr/local/cuda/lib64/libcudart.so.13 ]; then
    cudart=$(find / -name 'libcudart.so.13*' -not -path '/proc/*' 2>/dev/null | head -1)
    cublas=$(find / -name 'libcublas.so.13*' -not -path '/proc/*' 2>/dev/null | head -1)
    export LD_LIBRARY_PATH="$(dirname "$cudart"):$(dirname "$cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}   # the interpreter with PyTorch (and transformers, h5py, pytest)
# libnccl.so.2 (./moe and build/bench link it): the toolkit's, or PyTorch's wheel's.
if [ ! -e /usr/local/cuda/lib64/libnccl.so.2 ] && ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so.2 '; then
    nccl=$("$PY" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null ||
           dirname "$(find / -name 'libnccl.so.2' -not -path '/proc/*' 2>/dev/null | head -1)")
    export LD_LIBRARY_PATH="$nccl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "gpu_check: libnccl from $nccl"
fi
export MOE_MPIRUN=/tmp/moe-gpu/ompi/mpirun
# libcudnn.so.9 (opened at run time for fused attention): the system's, or PyTorch's wheel's.
if ! ldconfig -p 2>/dev/null | grep -q 'libcudnn.so.9 ' && [ ! -e /usr/local/cuda/lib64/libcudnn.so.9 ]; then
    cudnn=$("$PY" -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null ||
            dirname "$(find / -name 'libcudnn.so.9' -not -path '/proc/*' 2>/dev/null | head -1)")
    export LD_LIBRARY_PATH="$cudnn${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "gpu_check: libcudnn from $cudnn"
fi

ONLY=" $* "   # the steps named on the command line; all when none
step() {   # step NAME SECONDS COMMAND...: runs COMMAND into $OUT/NAME.txt, says how it ended
    local name=$1 limit=$2
    shift 2
    [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $name "* ]] || return 0
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    echo "gpu_check: $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.txt"
}

hf_check() {   # a small model trained on this repo's README, exported, compared
    local dir=/tmp/moe-gpu/hf
    mkdir -p "$dir"
    printf '[domain readme]\nkind = text\ntrain = README.md\nval = README.md\n' >"$dir/run.ini"
    ./moe train "$dir/run.ini" model.layers=2 model.d_model=64 model.heads=4 model.kv_heads=2 \
        model.seq_len=64 model.experts=4 model.expert_ffn_dim=96 model.tie_embeddings=false \
        train.steps=30 train.batch_size=8 train.eval_every=0 train.sample_tokens=0 \
        train.out_dir="$dir" train.name=tiny >/dev/null &&
        ./moe export "$dir/tiny" "$dir/export" &&
        ./moe eval "$dir/tiny" README.md --dump-logits "$dir/logits.h5" &&
        "$PY" tests/reference/mixtral_transformers.py "$dir/export" "$dir/logits.h5" cuda
}

nvidia-smi -L | tee "$OUT/summary.txt"
export -f hf_check
export PY
step cuda_ops 60 build/tests/cuda_ops
step cuda_train 150 "$PY" -m pytest -q -s -p no:cacheprovider tests/cuda/test_cuda_train.py
step nccl 60 "$PY" -m pytest -q -s -p no:cacheprovider tests/cuda/test_nccl_train.py
step hf 60 bash -c hf_check
step bench-gpu 150 build/bench --gpu --csv "$OUT/bench-gpu.csv"
step peer 120 build/bench --gpu-peer --steps 5 --python "$PY"
cat "$OUT/summary.txt"
