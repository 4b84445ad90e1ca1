// blas.h: choosing and checking OpenBLAS's compute kernel at start-up.
//
// OpenBLAS picks its kernel when the library loads, from CPUID or OPENBLAS_CORETYPE.
// Debian's build often under-detects (docs/architecture.md, "CPU": an AVX-512 machine gets its
// Haswell or Prescott kernel, 2-5x below the right one), so the moe binary sets
// OPENBLAS_CORETYPE from CPUID and re-executes itself before any work. A value the user
// set is always respected.
#ifndef MOE_CPU_BLAS_H
#define MOE_CPU_BLAS_H

// Returns normally when no re-exec is needed (or it failed; then the library's own
// choice stands). Call first thing in main.
void cpu_blas_select_kernel(char **argv);
// The kernel OpenBLAS runs, e.g. "SkylakeX".
const char *cpu_blas_kernel_name(void);
// Who chose it: "set by the user's OPENBLAS_CORETYPE", "chosen from CPUID", or
// "OpenBLAS's own detection".
const char *cpu_blas_kernel_origin(void);
// Compares a small sgemm with a naive product; returns 0 when they agree.
int cpu_blas_self_check(void);

#endif
