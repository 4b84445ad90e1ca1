#!/usr/bin/env bash
# Fetches the headers of cuDNN's C++ frontend (header-only; sdpa_cudnn.cpp reaches
# cuDNN's fused attention through it) into DIR/include, from PyPI's nvidia-cudnn-frontend
# wheel (Debian does not package it). Usage: fetch_cudnn_frontend.sh DIR VERSION PYTHON.
# Never fails the build: without network it says so, and the CUDA backend is built with
# the plain attention kernels only.
set -uo pipefail
dir=$1 version=$2 python=$3
[ -f "$dir/include/cudnn_frontend.h" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "moe: fetching cuDNN frontend headers $version (nvidia-cudnn-frontend, PyPI) into $dir"
if ! "$python" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
        -d "$tmp" "nvidia-cudnn-frontend==$version" >"$tmp/log" 2>&1; then
    echo "moe: note: cannot fetch the cuDNN frontend headers ($(tail -n 1 "$tmp/log")):" \
         "the CUDA backend is built without cuDNN's fused attention"
    exit 0
fi
mkdir -p "$dir"
"$python" - "$tmp" "$dir" <<'PY'
import glob, sys, zipfile
wheel = zipfile.ZipFile(glob.glob(sys.argv[1] + "/*.whl")[0])
for name in wheel.namelist():
    if name.startswith("include/"):
        wheel.extract(name, sys.argv[2])
PY
