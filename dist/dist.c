#include "dist.h"

#include <limits.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

#ifdef MOE_REAL_F64
#define MPI_REAL_T MPI_DOUBLE
#else
#define MPI_REAL_T MPI_FLOAT
#endif

static int rank, size = 1, started;
static uint64_t bytes_sent;
static double seconds;

// The variables mpirun (OpenMPI), MPICH's Hydra and srun (PMI-2, PMIx) give each rank.
static int launched_by_mpi(void) {
    static const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++)
        if (getenv(vars[i])) return 1;
    return 0;
}

static _Noreturn void abort_job(int code) {
    MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);   // MPI_Abort does not return; this keeps the compiler's promise
}

void dist_init(int *argc, char ***argv) {
    if (!launched_by_mpi()) return;
    int provided;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        FAIL("MPI_Init failed: this process was started by an MPI launcher but cannot join "
             "its job");
    started = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    // An error on any rank must end the job, not leave the others waiting in a
    // collective; MPI's own errors too (the default handler already aborts).
    util_set_exit_hook(abort_job);
    if (size > 1) {
        char prefix[32];
        snprintf(prefix, sizeof prefix, "rank %d: ", rank);
        util_set_error_prefix(prefix);
    }
    // Whole lines, so that two ranks' errors do not interleave character by character.
    setvbuf(stderr, NULL, _IOLBF, 1 << 12);
    if (rank != 0 && !freopen("/dev/null", "w", stdout))
        FAIL("rank %d: cannot redirect stdout to /dev/null", rank);
}

void dist_finalize(void) {
    if (!started) return;
    fflush(stdout);
    MPI_Finalize();
    started = 0;
}

int dist_rank(void) { return rank; }
int dist_size(void) { return size; }
int dist_lead(void) { return rank == 0; }

// MPI counts are int: larger buffers go in pieces.
static void sum_chunks(void *x, size_t n, MPI_Datatype type, size_t elem) {
    if (size == 1 || n == 0) return;
    double t0 = omp_get_wtime();
    char *p = x;
    for (size_t done = 0; done < n;) {
        size_t part = n - done < (size_t)INT_MAX ? n - done : (size_t)INT_MAX;
        CHECK(MPI_Allreduce(MPI_IN_PLACE, p + done * elem, (int)part, type, MPI_SUM,
                            MPI_COMM_WORLD) == MPI_SUCCESS, "MPI_Allreduce failed");
        done += part;
    }
    bytes_sent += n * elem;
    seconds += omp_get_wtime() - t0;
}

void dist_sum_doubles(double *x, size_t n) { sum_chunks(x, n, MPI_DOUBLE, sizeof *x); }
void dist_sum_i32(int32_t *x, size_t n) { sum_chunks(x, n, MPI_INT32_T, sizeof *x); }
void dist_sum_u64(uint64_t *x, size_t n) { sum_chunks(x, n, MPI_UINT64_T, sizeof *x); }

int dist_max_int(int x) {
    if (size == 1) return x;
    int out;
    CHECK(MPI_Allreduce(&x, &out, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD) == MPI_SUCCESS,
          "MPI_Allreduce failed");
    return out;
}

void dist_sum_tensor(const Backend *be, Tensor t, size_t n) {
    if (size == 1 || n == 0) return;
    CHECK(t.dtype == DTYPE_REAL && n <= t.numel, "dist_sum_tensor: %zu values of a tensor "
          "of %zu, dtype %d", n, t.numel, (int)t.dtype);
    if (t.device == DEVICE_CPU) {
        sum_chunks(t.data, n, MPI_REAL_T, sizeof(real));
        return;
    }
    real *host = CALLOC(n, sizeof *host);   // (n)
    be->download(host, t, n * sizeof *host);
    sum_chunks(host, n, MPI_REAL_T, sizeof *host);
    be->upload(t, host, n * sizeof *host);
    free(host);
}

void dist_broadcast(void *buf, size_t bytes, int root) {
    if (size == 1 || bytes == 0) return;
    CHECK(bytes <= (size_t)INT_MAX, "dist_broadcast: %zu bytes", bytes);
    double t0 = omp_get_wtime();
    CHECK(MPI_Bcast(buf, (int)bytes, MPI_BYTE, root, MPI_COMM_WORLD) == MPI_SUCCESS,
          "MPI_Bcast failed");
    if (rank == root) bytes_sent += bytes;
    seconds += omp_get_wtime() - t0;
}

void dist_barrier(void) {
    if (size > 1) MPI_Barrier(MPI_COMM_WORLD);
}

uint64_t dist_bytes_sent(void) { return bytes_sent; }
double dist_seconds(void) { return seconds; }
