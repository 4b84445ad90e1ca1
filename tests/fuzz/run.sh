#!/usr/bin/env bash
# Runs each fuzz target for a set time: tests/fuzz/run.sh BUILD SECONDS TARGET...
# (make fuzz, make fuzz-smoke). The seed corpus tests/fuzz/<target>/ is read, inputs that
# reach new code go to BUILD/corpus/<target>/, an input that finds something to
# BUILD/findings/<target>-*. Ends with one line per target; exits 1 on any finding.
set -uo pipefail
build="$1" seconds="$2"
shift 2
# Readers that FAIL through the fuzz hook (fuzzlib.h, FUZZ_CATCH) leave their allocations
# behind on a refusal, as at exit: leak detection would report every refusal.
no_leaks=" hf_config "
# HDF5 is built without frame pointers: only the slow unwinder sees the HDF5 frames that
# tests/sanitizers/lsan.supp names.
slow_unwind=" checkpoint "
# HDF5 asks for absurd sizes (a corrupt heap's length, 2^64 - 136 bytes; a corrupt chunk's
# stored size, 2 GB) and handles them, failing the read, as in production: there malloc
# returns NULL or untouched pages, where ASan and libFuzzer would stop at the request. The
# RSS limit still catches memory actually used.
null_on_huge=" checkpoint "
export LSAN_OPTIONS="suppressions=$PWD/tests/sanitizers/lsan.supp:print_suppressions=0"
mkdir -p "$build/findings" "$build/logs"
summary=() failed=0
for t in "$@"; do
    mkdir -p "$build/corpus/$t"
    leaks=1
    [[ "$no_leaks" == *" $t "* ]] && leaks=0
    fast=1
    [[ "$slow_unwind" == *" $t "* ]] && fast=0
    may_null=0 malloc_limit=2048
    [[ "$null_on_huge" == *" $t "* ]] && may_null=1 malloc_limit=1048576
    start=$SECONDS
    log="$build/logs/$t.log"
    # One thread: the targets are single-input readers, and the machine is shared.
    OMP_NUM_THREADS=1 ASAN_OPTIONS="detect_leaks=$leaks:fast_unwind_on_malloc=$fast:allocator_may_return_null=$may_null" \
        "$build/bin/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -malloc_limit_mb="$malloc_limit" -print_final_stats=1 \
        -artifact_prefix="$build/findings/$t-" "$build/corpus/$t" "tests/fuzz/$t" \
        >"$log" 2>&1
    rc=$? took=$((SECONDS - start))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        findings=0
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        findings="1 (${artifact:-no input written}; log $log)"
        grep -m1 -E 'ERROR|runtime error|fuzz:|moe: error' "$log" | sed "s/^/  $t: /"
    fi
    summary+=("fuzz $t: ${runs:-0} runs, ${speed:-0} execs/s, ${took} s, findings: $findings")
done
printf '%s\n' "${summary[@]}"
exit "$failed"
