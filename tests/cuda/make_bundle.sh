#!/usr/bin/env bash
# make gpu-bundle: packs what the GPU checks need on a machine that has a GPU but none of
# Debian's packages (the workplace's device machine: no package registry, a newer
# distribution) into .gpu/bundle.tar.xz (git-ignored):
#   moe, build/tests/cuda_ops, build/bench   built here, their RPATH pointed at lib/
#   lib/                                     every shared library they load, but glibc's
#                                            own and CUDA's (the GPU machine has those;
#                                            NCCL: the toolkit's or PyTorch's wheel's)
#   ompi/                                    Open MPI's runtime and an mpirun wrapper for
#                                            the NCCL check (tests/cuda/bundle_mpi.sh)
# tests/cuda/gpu_check.sh unpacks it there and runs the checks. The RPATH (DT_RPATH, not
# RUNPATH) covers the binaries' own dependencies and is not inherited by the Python
# processes the checks start, so PyTorch there keeps its own libraries.
set -euo pipefail
cd "$(dirname "$0")/../.."
LIB_DIR=/tmp/moe-gpu/lib   # where gpu_check.sh unpacks lib/
BINARIES="moe build/tests/cuda_ops build/bench"
for b in $BINARIES; do
    [ -x "$b" ] || { echo "make_bundle: $b is not built (make gpu-bundle builds it)"; exit 1; }
done
if ! command -v patchelf >/dev/null; then
    echo "moe: installing patchelf (sets the bundled binaries' RPATH)"
    apt-get install -y -qq --no-install-recommends patchelf >/dev/null
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/lib"
for b in $BINARIES; do
    mkdir -p "$stage/$(dirname "$b")"
    cp "$b" "$stage/$b"
    patchelf --force-rpath --set-rpath "$LIB_DIR:/usr/local/cuda/lib64" "$stage/$b"
done
# glibc's libraries must be the host's own; CUDA's come from the GPU machine's toolkit.
ldd $BINARIES | awk '/=> \//{print $3}' | sort -u |
    grep -v -E '/(libc|libm|libdl|libpthread|librt|libresolv)\.so|/ld-linux|libcuda|libcudart|libcublas|libnccl' |
    while read -r lib; do cp -L "$lib" "$stage/lib/"; done
bash tests/cuda/bundle_mpi.sh "$stage" "$(dirname "$LIB_DIR")"
mkdir -p .gpu
tar -C "$stage" -cf - . | xz -T0 -6 > .gpu/bundle.tar.xz.tmp
mv .gpu/bundle.tar.xz.tmp .gpu/bundle.tar.xz
echo "make_bundle: .gpu/bundle.tar.xz ($(du -h .gpu/bundle.tar.xz | cut -f1), $(ls "$stage/lib" | wc -l) libraries)"
echo "  on the GPU machine: bash tests/cuda/gpu_check.sh, carrying .gpu"
