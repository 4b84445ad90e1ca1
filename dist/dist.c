#include "dist.h"

#include <limits.h>
#include <mpi.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../kernels/backend.h"
#ifdef MOE_NCCL
#include "nccl.h"
#define HAVE_NCCL 1
#else
#define HAVE_NCCL 0
#endif

#ifdef MOE_REAL_F64
#define MPI_REAL_T MPI_DOUBLE
#else
#define MPI_REAL_T MPI_FLOAT
#endif

static int rank, size = 1, started;
static int ep_rank, ep_size = 1;
static MPI_Comm ep_comm = MPI_COMM_NULL;   // the expert group; MPI_COMM_WORLD until split
static MPI_Comm rep_comm = MPI_COMM_NULL;  // the expert replicas; MPI_COMM_WORLD until split
static uint64_t bytes_sent;
static double seconds;
static MPI_Request *pending;      // (cap) dist_sum_start's MPI requests not yet waited for
static size_t n_pending, cap_pending;
static int nccl_pending;          // dist_sum_start queued NCCL work
static real *block;               // (block_cap) the reduce-scatter's received block, kept
static size_t block_cap;          // from step to step: a block is about slab / P values

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

// Each rank's GPU: its rank among the job's ranks on its node (MPI's shared-memory split,
// whatever the launcher), before the CUDA backend starts.
static void select_gpu(void) {
    MPI_Comm node;
    int local = 0;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
        MPI_Comm_rank(node, &local);
        MPI_Comm_free(&node);
    }
    backend_set_cuda_device(local);
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
    ep_comm = rep_comm = MPI_COMM_WORLD;
    ep_rank = rank;
    ep_size = size;
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
    select_gpu();
}

void dist_finalize(void) {
    if (!started) return;
    fflush(stdout);
#if HAVE_NCCL
    dist_nccl_free();
#endif
    free(pending);
    free(block);
    block = NULL;
    block_cap = 0;
    if (ep_comm != MPI_COMM_WORLD) MPI_Comm_free(&ep_comm);
    if (rep_comm != MPI_COMM_WORLD) MPI_Comm_free(&rep_comm);
    MPI_Finalize();
    started = 0;
}

int dist_rank(void) { return rank; }
int dist_size(void) { return size; }
int dist_lead(void) { return rank == 0; }

void dist_split_expert_groups(int ep) {
    CHECK(ep >= 1 && size % ep == 0, "dist: expert groups of %d over %d ranks", ep, size);
    if (size == 1) return;
#if HAVE_NCCL
    dist_nccl_comm_free(DIST_EXPERT_GROUP);
    dist_nccl_comm_free(DIST_EXPERT_REPLICAS);
#endif
    if (ep_comm != MPI_COMM_WORLD) MPI_Comm_free(&ep_comm);
    if (rep_comm != MPI_COMM_WORLD) MPI_Comm_free(&rep_comm);
    CHECK(MPI_Comm_split(MPI_COMM_WORLD, rank / ep, rank % ep, &ep_comm) == MPI_SUCCESS &&
          MPI_Comm_split(MPI_COMM_WORLD, rank % ep, rank / ep, &rep_comm) == MPI_SUCCESS,
          "MPI_Comm_split failed");
    MPI_Comm_rank(ep_comm, &ep_rank);
    MPI_Comm_size(ep_comm, &ep_size);
}

int dist_ep_rank(void) { return ep_rank; }
int dist_ep_size(void) { return ep_size; }

static MPI_Comm group_comm(DistGroup g) {
    return g == DIST_EXPERT_GROUP ? ep_comm : g == DIST_EXPERT_REPLICAS ? rep_comm
                                                                      : MPI_COMM_WORLD;
}

// MPI counts are int: larger buffers go in pieces.
static void sum_chunks_in(MPI_Comm comm, void *x, size_t n, MPI_Datatype type, size_t elem) {
    if (size == 1 || n == 0) return;
    double t0 = omp_get_wtime();
    char *p = x;
    for (size_t done = 0; done < n;) {
        size_t part = n - done < (size_t)INT_MAX ? n - done : (size_t)INT_MAX;
        CHECK(MPI_Allreduce(MPI_IN_PLACE, p + done * elem, (int)part, type, MPI_SUM, comm) ==
              MPI_SUCCESS, "MPI_Allreduce failed");
        done += part;
    }
    bytes_sent += n * elem;
    seconds += omp_get_wtime() - t0;
}

static void sum_chunks(void *x, size_t n, MPI_Datatype type, size_t elem) {
    sum_chunks_in(MPI_COMM_WORLD, x, n, type, elem);
}

void dist_sum_doubles(double *x, size_t n) { sum_chunks(x, n, MPI_DOUBLE, sizeof *x); }
void dist_sum_doubles_in(DistGroup g, double *x, size_t n) {
    sum_chunks_in(group_comm(g), x, n, MPI_DOUBLE, sizeof *x);
}
void dist_sum_i32(int32_t *x, size_t n) { sum_chunks(x, n, MPI_INT32_T, sizeof *x); }
void dist_sum_u64(uint64_t *x, size_t n) { sum_chunks(x, n, MPI_UINT64_T, sizeof *x); }

int dist_max_int(int x) {
    if (size == 1) return x;
    int out;
    CHECK(MPI_Allreduce(&x, &out, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD) == MPI_SUCCESS,
          "MPI_Allreduce failed");
    return out;
}

// Device tensors through NCCL: the build has it and the run has MPI.
static int on_nccl(const Tensor t) { return HAVE_NCCL && started && t.device != DEVICE_CPU; }

#if HAVE_NCCL
// Group g's NCCL communicator; a group spanning every rank (the same ranks in the same
// order: the split keeps the world's order) shares the world's.
static NcclComm *nccl_of(DistGroup g) {
    if (dist_group_size(g) == size) g = DIST_ALL;
    return dist_nccl_comm(g, group_comm(g));
}
#endif

int dist_has_nccl(void) { return HAVE_NCCL; }

int dist_sums(const Backend *be) {
    return size > 1 || (HAVE_NCCL && started && be->device != DEVICE_CPU);
}

static void check_real(Tensor t, size_t n, const char *what) {
    CHECK(t.dtype == DTYPE_REAL && n <= t.numel, "dist: %s of %zu values over a tensor of %zu "
          "(dtype %d)", what, n, t.numel, (int)t.dtype);
}

void dist_sum_tensor(const Backend *be, Tensor t, size_t n) {
    dist_sum_tensor_in(DIST_ALL, be, t, n);
}

void dist_sum_tensor_in(DistGroup g, const Backend *be, Tensor t, size_t n) {
    if (!dist_sums(be) || n == 0) return;
    check_real(t, n, "sum");
    if (on_nccl(t)) {
        dist_sum_start(g, be, t, 0, n);
        dist_sum_wait();
        return;
    }
    MPI_Comm comm = group_comm(g);
    if (t.device == DEVICE_CPU) {
        sum_chunks_in(comm, t.data, n, MPI_REAL_T, sizeof(real));
        return;
    }
    real *host = CALLOC(n, sizeof *host);   // (n)
    be->download(host, t, n * sizeof *host);
    sum_chunks_in(comm, host, n, MPI_REAL_T, sizeof *host);
    be->upload(t, host, n * sizeof *host);
    free(host);
}

static MPI_Request *new_request(void) {
    if (n_pending == cap_pending) {
        cap_pending = cap_pending ? 2 * cap_pending : 64;
        pending = realloc(pending, cap_pending * sizeof *pending);
        CHECK(pending, "out of memory for %zu MPI requests", cap_pending);
    }
    return &pending[n_pending++];
}

void dist_sum_start(DistGroup g, const Backend *be, Tensor t, size_t lo, size_t n) {
    if (!dist_sums(be) || n == 0) return;
    check_real(t, lo + n, "sum");
    double t0 = omp_get_wtime();
    if (on_nccl(t)) {
        // A one-rank group of a larger job sums nothing (a one-rank job still goes through
        // NCCL: one GPU checks the path).
        if (size > 1 && dist_group_size(g) == 1) return;
#if HAVE_NCCL
        dist_nccl_sum_start(nccl_of(g), (real *)t.data + lo, n);
#endif
        nccl_pending = 1;
    } else if (t.device != DEVICE_CPU) {
        dist_sum_tensor_in(g, be, tensor_slice(t, lo, n), n);   // staged through the host: blocking
        return;
    } else {
        real *x = (real *)t.data + lo;
        for (size_t done = 0; done < n;) {
            size_t part = n - done < (size_t)INT_MAX ? n - done : (size_t)INT_MAX;
            CHECK(MPI_Iallreduce(MPI_IN_PLACE, x + done, (int)part, MPI_REAL_T, MPI_SUM,
                                 group_comm(g), new_request()) == MPI_SUCCESS,
                  "MPI_Iallreduce failed");
            done += part;
        }
    }
    bytes_sent += n * sizeof(real);
    seconds += omp_get_wtime() - t0;
}

void dist_progress(void) {
    if (n_pending == 0) return;
    double t0 = omp_get_wtime();
    int done;
    CHECK(MPI_Testall((int)n_pending, pending, &done, MPI_STATUSES_IGNORE) == MPI_SUCCESS,
          "MPI_Testall failed");
    if (done) n_pending = 0;
    seconds += omp_get_wtime() - t0;
}

void dist_sum_wait(void) {
    double t0 = omp_get_wtime();
    if (n_pending)
        CHECK(MPI_Waitall((int)n_pending, pending, MPI_STATUSES_IGNORE) == MPI_SUCCESS,
              "MPI_Waitall failed");
    n_pending = 0;
#if HAVE_NCCL
    if (nccl_pending) dist_nccl_join();
#endif
    nccl_pending = 0;
    seconds += omp_get_wtime() - t0;
}

// MPI's int counts and displacements of the blocks.
static void block_counts(int P, const size_t *bounds, int *counts, int *displs) {
    for (int r = 0; r < P; r++) {
        CHECK(bounds[r + 1] >= bounds[r] && bounds[r + 1] - bounds[r] <= (size_t)INT_MAX &&
              bounds[r] <= (size_t)INT_MAX, "dist: block %d [%zu, %zu) beyond MPI's int counts",
              r, bounds[r], bounds[r + 1]);
        counts[r] = (int)(bounds[r + 1] - bounds[r]);
        displs[r] = (int)bounds[r];
    }
}

// The host copy of t's first n values: t itself on the CPU, else a download.
static real *host_view(const Backend *be, Tensor t, size_t n) {
    if (t.device == DEVICE_CPU) return t.data;
    real *host = CALLOC(n, sizeof *host);   // (n)
    be->download(host, t, n * sizeof *host);
    return host;
}

// Back to the device: values [lo, hi) of the host copy.
static void host_done(const Backend *be, Tensor t, real *host, size_t lo, size_t hi) {
    if (t.device == DEVICE_CPU) return;
    if (hi > lo) be->upload(tensor_slice(t, lo, hi - lo), host + lo, (hi - lo) * sizeof *host);
    free(host);
}

int dist_group_rank(DistGroup g) {
    int r = 0;
    if (started) MPI_Comm_rank(group_comm(g), &r);
    return r;
}

int dist_group_size(DistGroup g) {
    int n = 1;
    if (started) MPI_Comm_size(group_comm(g), &n);
    return n;
}

void dist_reduce_scatter_tensor(DistGroup g, const Backend *be, Tensor t, const size_t *bounds) {
    const int P = dist_group_size(g), me = dist_group_rank(g);
    if (P == 1) return;
    size_t lo = bounds[me], hi = bounds[me + 1], n = bounds[P];
    check_real(t, n, "reduce-scatter");
    if (on_nccl(t)) {
        double t0 = omp_get_wtime();
#if HAVE_NCCL
        dist_nccl_reduce_scatter(nccl_of(g), t.data, bounds);
#endif
        bytes_sent += n * sizeof(real);
        seconds += omp_get_wtime() - t0;
        return;
    }
    int *counts = CALLOC((size_t)P, sizeof *counts), *displs = CALLOC((size_t)P, sizeof *displs);
    block_counts(P, bounds, counts, displs);
    double t0 = omp_get_wtime();
    if (!block || hi - lo > block_cap) {   // never empty: MPI's buffers may not alias
        block_cap = hi - lo > 1 ? hi - lo : 1;
        free(block);
        block = CALLOC(block_cap, sizeof *block);
    }
    real *host = host_view(be, t, n);
    CHECK(MPI_Reduce_scatter(host, block, counts, MPI_REAL_T, MPI_SUM, group_comm(g)) ==
          MPI_SUCCESS, "MPI_Reduce_scatter failed");
    if (hi > lo) memcpy(host + lo, block, (hi - lo) * sizeof *block);
    host_done(be, t, host, lo, hi);
    bytes_sent += n * sizeof(real);
    seconds += omp_get_wtime() - t0;
    free(counts);
    free(displs);
}

void dist_allgather_tensor(DistGroup g, const Backend *be, Tensor t, const size_t *bounds) {
    const int P = dist_group_size(g), me = dist_group_rank(g);
    if (P == 1) return;
    size_t n = bounds[P];
    check_real(t, n, "all-gather");
    if (on_nccl(t)) {
        double t0 = omp_get_wtime();
#if HAVE_NCCL
        dist_nccl_allgather(nccl_of(g), t.data, bounds);
#endif
        bytes_sent += (bounds[me + 1] - bounds[me]) * sizeof(real);
        seconds += omp_get_wtime() - t0;
        return;
    }
    int *counts = CALLOC((size_t)P, sizeof *counts), *displs = CALLOC((size_t)P, sizeof *displs);
    block_counts(P, bounds, counts, displs);
    double t0 = omp_get_wtime();
    real *host = host_view(be, t, n);
    CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, host, counts, displs, MPI_REAL_T,
                         group_comm(g)) == MPI_SUCCESS, "MPI_Allgatherv failed");
    host_done(be, t, host, 0, n);
    bytes_sent += (bounds[me + 1] - bounds[me]) * sizeof(real);
    seconds += omp_get_wtime() - t0;
    free(counts);
    free(displs);
}

void dist_gather_tensor(DistGroup g, const Backend *be, Tensor src, Tensor dst,
                        const size_t *bounds, int root) {
    const int P = dist_group_size(g), me = dist_group_rank(g);
    size_t mine = bounds[me + 1] - bounds[me], n = bounds[P];
    CHECK(src.dtype == DTYPE_REAL && mine <= src.numel && (me != root || n <= dst.numel),
          "dist: gather of %zu values into %zu", mine, dst.numel);
    CHECK(P > 1, "dist: gather within a group of one process");
    int *counts = CALLOC((size_t)P, sizeof *counts), *displs = CALLOC((size_t)P, sizeof *displs);
    block_counts(P, bounds, counts, displs);
    double t0 = omp_get_wtime();
    real *in = host_view(be, src, mine), *out = me == root ? host_view(be, dst, n) : NULL;
    CHECK(MPI_Gatherv(in, (int)mine, MPI_REAL_T, out, counts, displs, MPI_REAL_T, root,
                      group_comm(g)) == MPI_SUCCESS, "MPI_Gatherv failed");
    if (src.device != DEVICE_CPU) free(in);
    if (out) host_done(be, dst, out, 0, n);
    bytes_sent += mine * sizeof(real);
    seconds += omp_get_wtime() - t0;
    free(counts);
    free(displs);
}

void dist_alltoall_i32(const int32_t *send, int32_t *recv, size_t n) {
    CHECK(n <= (size_t)INT_MAX, "dist: all-to-all of %zu values per rank", n);
    double t0 = omp_get_wtime();
    CHECK(MPI_Alltoall(send, (int)n, MPI_INT32_T, recv, (int)n, MPI_INT32_T, ep_comm) ==
          MPI_SUCCESS, "MPI_Alltoall failed");
    bytes_sent += (size_t)(ep_size - 1) * n * sizeof *send;
    seconds += omp_get_wtime() - t0;
}

// The expert group's size_t counts and displacements as MPI's ints.
static int *as_ints(const size_t *v) {
    int *out = CALLOC((size_t)ep_size, sizeof *out);
    for (int q = 0; q < ep_size; q++) {
        CHECK(v[q] <= (size_t)INT_MAX, "dist: all-to-all count or offset %zu beyond MPI's "
              "int", v[q]);
        out[q] = (int)v[q];
    }
    return out;
}

void dist_alltoallv_reals(const real *send, const size_t *scount, const size_t *sdispl,
                          real *recv, const size_t *rcount, const size_t *rdispl) {
    int *sc = as_ints(scount), *sd = as_ints(sdispl), *rc = as_ints(rcount),
        *rd = as_ints(rdispl);
    double t0 = omp_get_wtime();
    CHECK(MPI_Alltoallv(send, sc, sd, MPI_REAL_T, recv, rc, rd, MPI_REAL_T, ep_comm) ==
          MPI_SUCCESS, "MPI_Alltoallv failed");
    for (int q = 0; q < ep_size; q++)
        if (q != ep_rank) bytes_sent += scount[q] * sizeof(real);
    seconds += omp_get_wtime() - t0;
    free(sc);
    free(sd);
    free(rc);
    free(rd);
}

void dist_alltoallv_tensor(const Backend *be, Tensor send, const size_t *scount,
                           const size_t *sdispl, Tensor recv, const size_t *rcount,
                           const size_t *rdispl) {
    CHECK(send.device == recv.device && send.device == be->device, "dist: all-to-all between "
          "devices %d and %d on the %s backend", (int)send.device, (int)recv.device, be->name);
    for (int q = 0; q < ep_size; q++) {
        check_real(send, sdispl[q] + scount[q], "all-to-all send");
        check_real(recv, rdispl[q] + rcount[q], "all-to-all receive");
    }
    if (send.device == DEVICE_CPU) {
        dist_alltoallv_reals(send.data, scount, sdispl, recv.data, rcount, rdispl);
        return;
    }
    CHECK(on_nccl(send), "dist: all-to-all of %s tensors needs NCCL (a CUDA build under an "
          "MPI launcher)", be->name);
    double t0 = omp_get_wtime();
#if HAVE_NCCL
    dist_nccl_alltoallv(nccl_of(DIST_EXPERT_GROUP), send.data, scount, sdispl, recv.data,
                        rcount, rdispl);
#endif
    for (int q = 0; q < ep_size; q++)
        if (q != ep_rank) bytes_sent += scount[q] * sizeof(real);
    seconds += omp_get_wtime() - t0;
}

// MPI counts are int: larger buffers go in pieces, sent and received alike.
void dist_send_reals(const real *x, size_t n, int dst) {
    double t0 = omp_get_wtime();
    for (size_t done = 0; done < n;) {
        size_t part = n - done < (size_t)INT_MAX ? n - done : (size_t)INT_MAX;
        CHECK(MPI_Send(x + done, (int)part, MPI_REAL_T, dst, 0, MPI_COMM_WORLD) == MPI_SUCCESS,
              "MPI_Send failed");
        done += part;
    }
    bytes_sent += n * sizeof *x;
    seconds += omp_get_wtime() - t0;
}

void dist_recv_reals(real *x, size_t n, int src) {
    double t0 = omp_get_wtime();
    for (size_t done = 0; done < n;) {
        size_t part = n - done < (size_t)INT_MAX ? n - done : (size_t)INT_MAX;
        CHECK(MPI_Recv(x + done, (int)part, MPI_REAL_T, src, 0, MPI_COMM_WORLD,
                       MPI_STATUS_IGNORE) == MPI_SUCCESS, "MPI_Recv failed");
        done += part;
    }
    seconds += omp_get_wtime() - t0;
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
