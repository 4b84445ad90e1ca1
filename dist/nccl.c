#include "nccl.h"

#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>
#include <stdio.h>

#include "../base/util.h"

_Static_assert(sizeof(real) == sizeof(float), "NCCL carries the fp32 build's tensors only");

#define NCCL_CHECK(call)                                                                   \
    do {                                                                                   \
        ncclResult_t nccl_rc_ = (call);                                                    \
        if (nccl_rc_ != ncclSuccess)                                                       \
            util_die(__FILE__, __LINE__, "NCCL: %s: %s (%s)", #call,                       \
                     ncclGetErrorString(nccl_rc_), ncclGetLastError(comm));                \
    } while (0)

#define CUDA_CHECK(call)                                                                   \
    do {                                                                                   \
        cudaError_t cuda_rc_ = (call);                                                     \
        if (cuda_rc_ != cudaSuccess)                                                       \
            util_die(__FILE__, __LINE__, "CUDA: %s: %s", #call, cudaGetErrorString(cuda_rc_)); \
    } while (0)

static ncclComm_t comm;
static cudaStream_t stream;            // NCCL's, non-blocking: it can overlap the backend's
static cudaEvent_t issued, finished;   // the backend's work so far; NCCL's work so far
static int rank, size;

static void comm_init(void) {
    if (comm) return;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    ncclUniqueId id;
    if (rank == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    CHECK(MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD) == MPI_SUCCESS,
          "MPI_Bcast of the NCCL id failed");
    NCCL_CHECK(ncclCommInitRank(&comm, size, id, rank));
    int version, gpu;
    NCCL_CHECK(ncclGetVersion(&version));
    CUDA_CHECK(cudaGetDevice(&gpu));
    // Rank 0's stdout is the job's: the tests and the GPU check look for this line.
    printf("dist: NCCL %d.%d.%d communicator over %d rank(s), rank 0 on GPU %d\n",
           version / 10000, version / 100 % 100, version % 100, size, gpu);
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&issued, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&finished, cudaEventDisableTiming));
}

// NCCL's stream waits for the values the backend's kernels are still writing.
static void after_backend(void) {
    comm_init();
    CUDA_CHECK(cudaEventRecord(issued, cudaStreamLegacy));
    CUDA_CHECK(cudaStreamWaitEvent(stream, issued, 0));
}

void dist_nccl_join(void) {
    if (!comm) return;
    CUDA_CHECK(cudaEventRecord(finished, stream));
    CUDA_CHECK(cudaStreamWaitEvent(cudaStreamLegacy, finished, 0));
}

void dist_nccl_sum_start(real *x, size_t n) {
    after_backend();
    NCCL_CHECK(ncclAllReduce(x, x, n, ncclFloat, ncclSum, comm, stream));
}

void dist_nccl_reduce_scatter(real *x, const size_t *bounds) {
    after_backend();
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < size; r++)   // an empty block is empty on every rank: skipped by all
        if (bounds[r + 1] > bounds[r])
            NCCL_CHECK(ncclReduce(x + bounds[r], x + bounds[r], bounds[r + 1] - bounds[r],
                                  ncclFloat, ncclSum, r, comm, stream));
    NCCL_CHECK(ncclGroupEnd());
    dist_nccl_join();
}

void dist_nccl_allgather(real *x, const size_t *bounds) {
    after_backend();
    NCCL_CHECK(ncclGroupStart());
    for (int r = 0; r < size; r++)
        if (bounds[r + 1] > bounds[r])
            NCCL_CHECK(ncclBroadcast(x + bounds[r], x + bounds[r], bounds[r + 1] - bounds[r],
                                     ncclFloat, r, comm, stream));
    NCCL_CHECK(ncclGroupEnd());
    dist_nccl_join();
}

void dist_nccl_alltoallv(const real *send, const size_t *scount, const size_t *sdispl,
                         real *recv, const size_t *rcount, const size_t *rdispl) {
    after_backend();
    NCCL_CHECK(ncclGroupStart());
    for (int q = 0; q < size; q++) {
        if (scount[q]) NCCL_CHECK(ncclSend(send + sdispl[q], scount[q], ncclFloat, q, comm, stream));
        if (rcount[q]) NCCL_CHECK(ncclRecv(recv + rdispl[q], rcount[q], ncclFloat, q, comm, stream));
    }
    NCCL_CHECK(ncclGroupEnd());
    dist_nccl_join();
}

void dist_nccl_free(void) {
    if (!comm) return;
    CUDA_CHECK(cudaStreamSynchronize(stream));
    NCCL_CHECK(ncclCommDestroy(comm));
    cudaEventDestroy(issued);
    cudaEventDestroy(finished);
    cudaStreamDestroy(stream);
    comm = NULL;
}
