// nccl.h: the collectives of dist.c on device buffers, through NCCL (dist/nccl.c, built
// with the CUDA backend only: the Makefile then defines MOE_NCCL for dist.c; a CPU-only
// build has no NCCL dependency).
//
// One communicator per process group of dist.h (DistGroup: every rank, the rank's expert
// group, its expert replicas), each over the ranks of that group's MPI communicator and
// made on the group's first call (collective over the group, like every call here): the
// group's first rank makes the ncclUniqueId, MPI_Bcast gives it to the group's ranks,
// each joins with ncclCommInitRank on the GPU the CUDA backend selected. Every
// communicator runs on one stream of NCCL's own, which first waits for the work already
// issued on the backend's stream (the legacy default stream); the backend's later work
// waits for NCCL's at dist_nccl_join, which the blocking calls make themselves. Every
// rank issues the same calls in the same order (dist.h), so the groups' operations queue
// on that one stream in one order everywhere. Buffers are device pointers of `real`
// (float: the CUDA backend is fp32), counts in values.
#ifndef MOE_DIST_NCCL_H
#define MOE_DIST_NCCL_H

#include <mpi.h>
#include <stddef.h>

#include "../kernels/kernels.h"
#include "dist.h"

typedef struct NcclComm NcclComm;

// Group g's communicator over the ranks of mpi (its MPI communicator), made on first use.
NcclComm *dist_nccl_comm(DistGroup g, MPI_Comm mpi);
// Group g's communicator destroyed (nothing if none was made), before its MPI
// communicator is replaced (a new split into expert groups).
void dist_nccl_comm_free(DistGroup g);

// In-place sum of x (n) over c's ranks, queued; the caller joins later.
void dist_nccl_sum_start(NcclComm *c, real *x, size_t n);
// The backend's stream waits for everything queued on NCCL's.
void dist_nccl_join(void);
// x (bounds[P]), P = c's ranks: block r = [bounds[r], bounds[r+1]) summed into rank r's
// block (a reduce per block, rooted at its owner, in one group: NCCL's reduce-scatter
// wants equal blocks); the other blocks keep this rank's values.
void dist_nccl_reduce_scatter(NcclComm *c, real *x, const size_t *bounds);
// Block r of x from c's rank r to every rank of c (a broadcast per block, in one group).
void dist_nccl_allgather(NcclComm *c, real *x, const size_t *bounds);
// Grouped ncclSend / ncclRecv with every peer of c that has rows for it or from it
// (scount, sdispl, rcount, rdispl: one per rank of c).
void dist_nccl_alltoallv(NcclComm *c, const real *send, const size_t *scount,
                         const size_t *sdispl, real *recv, const size_t *rcount,
                         const size_t *rdispl);
// Before MPI_Finalize: every communicator made, and the stream.
void dist_nccl_free(void);

#endif
