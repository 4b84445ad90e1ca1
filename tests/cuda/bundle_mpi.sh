#!/usr/bin/env bash
# Called by make_bundle.sh: Debian's Open MPI runtime for the GPU machine's NCCL check
# (mpirun -np 1, tests/cuda/test_nccl_train.py), which has no MPI of its own. Stages into
# STAGE/ompi the launcher (orterun, orted), Open MPI's components, PMIx's plugins, their
# help texts and settings, and STAGE/ompi/mpirun: a wrapper that points Open MPI and PMIx
# at those copies (OPAL_*, PMIX_* install-directory variables) and LD_LIBRARY_PATH at
# STAGE/lib (the wrapper's environment only: Python there keeps its own libraries). The
# libraries all of it loads go to STAGE/lib with the binaries'.
#     bundle_mpi.sh STAGE ROOT     (ROOT: where STAGE unpacks on the GPU machine)
set -euo pipefail
stage=$1 root=$2
info() { ompi_info --path "$1" --parsable | cut -d: -f3-; }
pmix=$(dirname "$(readlink -f "$(ldconfig -p | awk '/libpmix.so.2 /{print $NF; exit}')")")
case "$pmix" in */pmix2/lib) pmix=${pmix%/lib} ;; *) pmix= ;; esac
mkdir -p "$stage/ompi/bin"
cp -L "$(info bindir)/orterun" "$(info bindir)/orted" "$stage/ompi/bin/"
cp -rL "$(info pkglibdir)" "$stage/ompi/components"
cp -rL "$(info pkgdatadir)" "$stage/ompi/share"
cp -rL "$(info sysconfdir)" "$stage/ompi/etc"
if [ -n "$pmix" ]; then
    cp -rL "$pmix/lib/pmix" "$stage/ompi/pmix-plugins"
    cp -rL "$pmix/share/pmix" "$stage/ompi/pmix-share"
fi
{ ldd "$stage"/ompi/bin/* "$stage"/ompi/components/*.so \
      ${pmix:+"$stage"/ompi/pmix-plugins/*.so} 2>/dev/null || true; } |
    awk '/=> \//{print $3}' | sort -u |
    grep -v -E '/(libc|libm|libdl|libpthread|librt|libresolv)\.so|/ld-linux|libcuda' |
    while read -r lib; do cp -nL "$lib" "$stage/lib/"; done
r=$root/ompi
cat >"$stage/ompi/mpirun" <<WRAP
#!/bin/sh
# Open MPI from the bundle (tests/cuda/bundle_mpi.sh).
export OPAL_PREFIX=$r OPAL_BINDIR=$r/bin OPAL_LIBDIR=$root/lib OPAL_PKGLIBDIR=$r/components \\
    OPAL_PKGDATADIR=$r/share OPAL_SYSCONFDIR=$r/etc OPAL_DATADIR=$r/share \\
    PMIX_PREFIX=$r PMIX_PKGLIBDIR=$r/pmix-plugins PMIX_PKGDATADIR=$r/pmix-share \\
    PMIX_MCA_mca_base_component_path=$r/pmix-plugins \\
    OMPI_MCA_mca_base_component_path=$r/components \\
    LD_LIBRARY_PATH=$root/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} PATH=$r/bin:\$PATH
exec $r/bin/orterun "\$@"
WRAP
chmod +x "$stage/ompi/mpirun"
