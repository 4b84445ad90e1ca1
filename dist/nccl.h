// nccl.h: the collectives of dist.c on device buffers, through NCCL (dist/nccl.c, built
// with the CUDA backend only: the Makefile then defines MOE_NCCL for dist.c; a CPU-only
// build has no NCCL dependency).
//
// One communicator over MPI_COMM_WORLD's ranks, made on the first call (collective, like
// every call here): rank 0 makes the ncclUniqueId, MPI_Bcast gives it to every rank,
// each joins with ncclCommInitRank on the GPU the CUDA backend selected. NCCL runs on a
// stream of its own that first waits for the work already issued on the backend's stream
// (the legacy default stream); the backend's later work waits for NCCL's at
// dist_nccl_join, which the blocking calls make themselves. Buffers are device pointers
// of `real` (float: the CUDA backend is fp32), counts in values.
#ifndef MOE_DIST_NCCL_H
#define MOE_DIST_NCCL_H

#include <stddef.h>

#include "../kernels/kernels.h"

// In-place sum of x (n) over every rank, queued; the caller joins later.
void dist_nccl_sum_start(real *x, size_t n);
// The backend's stream waits for everything queued on NCCL's.
void dist_nccl_join(void);
// x (bounds[P]): block r = [bounds[r], bounds[r+1]) summed into rank r's block (a reduce
// per block, rooted at its owner, in one group: NCCL's reduce-scatter wants equal
// blocks); the other blocks keep this rank's values.
void dist_nccl_reduce_scatter(real *x, const size_t *bounds);
// Block r of x from rank r to every rank (a broadcast per block, in one group).
void dist_nccl_allgather(real *x, const size_t *bounds);
// Grouped ncclSend / ncclRecv with every peer that has rows for it or from it.
void dist_nccl_alltoallv(const real *send, const size_t *scount, const size_t *sdispl,
                         real *recv, const size_t *rcount, const size_t *rdispl);
// Before MPI_Finalize; nothing if no communicator was made.
void dist_nccl_free(void);

#endif
