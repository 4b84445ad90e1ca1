#include "nccl.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdio.h>

#include "../base/util.h"

_Static_assert(sizeof(real) == sizeof(float), "NCCL carries the fp32 build's tensors only");

// ncclGetLastError's communicator argument is unused (NCCL 2.13+): NULL.
#define NCCL_CHECK(call)                                                                   \
    do {                                                                                   \
        ncclResult_t nccl_rc_ = (call);                                                    \
        if (nccl_rc_ != ncclSuccess)                                                       \
            util_die(__FILE__, __LINE__, "NCCL: %s: %s (%s)", #call,                       \
                     ncclGetErrorString(nccl_rc_), ncclGetLastError(NULL));                \
    } while (0)

#define CUDA_CHECK(call)                                                                   \
    do {                                                                                   \
        cudaError_t cuda_rc_ = (call);                                                     \
        if (cuda_rc_ != cudaSuccess)                                                       \
            util_die(__FILE__, __LINE__, "CUDA: %s: %s", #call, cudaGetErrorString(cuda_rc_)); \
    } while (0)

struct NcclComm {
    ncclComm_t comm;   // NULL until the group's first call
    int rank, size;    // this rank's place in the group, the group's ranks
};

#define N_GROUPS 3
_Static_assert(DIST_EXPERT_REPLICAS == N_GROUPS - 1, "one communicator per DistGroup");
static NcclComm comms[N_GROUPS];       // one per DistGroup
static cudaStream_t stream;            // NCCL's, non-blocking: it can overlap the backend's
static cudaEvent_t issued, finished;   // the backend's work so far; NCCL's work so far

static void stream_init(void) {
    if (stream) return;
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&issued, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&finished, cudaEventDisableTiming));
}

// Rank 0's stdout is the job's: the tests and the GPU check look for the first line.
static void announce(DistGroup g, const NcclComm *c) {
    int version, gpu;
    NCCL_CHECK(ncclGetVersion(&version));
    CUDA_CHECK(cudaGetDevice(&gpu));
    if (g == DIST_ALL)
        printf("dist: NCCL %d.%d.%d communicator over %d rank(s), rank 0 on GPU %d\n",
               version / 10000, version / 100 % 100, version % 100, c->size, gpu);
    else
        printf("dist: NCCL communicator of each %s, %d rank(s) each\n",
               g == DIST_EXPERT_GROUP ? "expert group" : "set of expert replicas", c->size);
}

NcclComm *dist_nccl_comm(DistGroup g, MPI_Comm mpi) {
    CHECK((int)g >= 0 && (int)g < N_GROUPS, "internal: NCCL group %d", (int)g);
    NcclComm *c = &comms[g];
    if (c->comm) return c;
    stream_init();
    MPI_Comm_rank(mpi, &c->rank);
    MPI_Comm_size(mpi, &c->size);
    ncclUniqueId id;
    if (c->rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    CHECK(MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, mpi) == MPI_SUCCESS,
          "MPI_Bcast of the NCCL id failed");
    NCCL_CHECK(ncclCommInitRank(&c->comm, c->size, id, c->rank));
    announce(g, c);
    return c;
}

void dist_nccl_comm_free(DistGroup g) {
    NcclComm *c = &comms[g];
    if (!c->comm) return;
    CUDA_CHECK(cudaStreamSynchronize(stream));
    NCCL_CHECK(ncclCommDestroy(c->comm));
    c->comm = NULL;
}

// NCCL's stream waits for the values the backend's kernels are still writing.
static void after_backend(void) {
    CUDA_CHECK(cudaEventRecord(issued, cudaStreamLegacy));
    CUDA_CHECK(cudaStreamWaitEvent(stream, issued, 0));
}

void dist_nccl_join(void) {
    if (!stream) return;
    CUDA_CHECK(cudaEventRecord(finished, stream));
    CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, finished, 0));
}

void dist_nccl_sum_start(NcclComm *c, real *x, size_t n) {
    after_backend();
    NCCL_CHECK(ncclAllReduce(x, x, n, ncclFloat, ncclSum, c->comm, stream));
}

void dist_nccl_reduce_scatter(NcclComm *c, real *x, const size_t *bounds) {
    after_backend();
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < c->size; r++)   // an empty block is empty on every rank: skipped by all
        if (bounds[r + 1] > bounds[r])
            NCCL_CHECK(ncclReduce(x + bounds[r], x + bounds[r], bounds[r + 1] - bounds[r],
                                  ncclFloat, ncclSum, r, c->comm, stream));
    NCCL_CHECK(ncclGroupEnd());
    dist_nccl_join();
}

void dist_nccl_allgather(NcclComm *c, real *x, const size_t *bounds) {
    after_backend();
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < c->size; r++)
        if (bounds[r + 1] > bounds[r])
            NCCL_CHECK(ncclBroadcast(x + bounds[r], x + bounds[r], bounds[r + 1] - bounds[r],
                                     ncclFloat, r, c->comm, stream));
    NCCL_CHECK(ncclGroupEnd());
    dist_nccl_join();
}

void dist_nccl_alltoallv(NcclComm *c, const real *send, const size_t *scount,
                         const size_t *sdispl, real *recv, const size_t *rcount,
                         const size_t *rdispl) {
    after_backend();
    NCCL_CHECK(ncclGroupStart());
    for (int q = 0; q < c->size; q++) {
        if (scount[q])
            NCCL_CHECK(ncclSend(send + sdispl[q], scount[q], ncclFloat, q, c->comm, stream));
        if (rcount[q])
            NCCL_CHECK(ncclRecv(recv + rdispl[q], rcount[q], ncclFloat, q, c->comm, stream));
    }
    NCCL_CHECK(ncclGroupEnd());
    dist_nccl_join();
}

void dist_nccl_free(void) {
    for (int g = 0; g < N_GROUPS; g++) dist_nccl_comm_free((DistGroup)g);
    if (!stream) return;
    cudaEventDestroy(issued);
    cudaEventDestroy(finished);
    cudaStreamDestroy(stream);
    stream = NULL;
}
