// dist.h: the process group of a distributed run (MPI) and the collectives the trainer
// uses on host buffers and on backend tensors.
//
// A run launched by mpirun or srun (the launcher's rank variables are in the
// environment) initialises MPI and is one rank of MPI_COMM_WORLD; any other run has no
// MPI at all and is rank 0 of 1, and every collective here is then a no-op. Rank 0 alone
// keeps stdout (the other ranks' goes to /dev/null); every rank keeps stderr, and its
// errors (FAIL, DIE) carry "rank R: " and end the whole job (MPI_Abort).
//
// Collectives must be called by every rank in the same order. Sums of floating-point
// values follow MPI's reduction order, which may differ from a single process's
// accumulation order in the last bits. Host buffers go through MPI. Device tensors go
// through NCCL when the binary has the CUDA backend (dist/nccl.h: one communicator per
// group below, made on the group's first use; each rank's GPU is its rank among the job's
// ranks on its node, modulo the node's GPUs); a build without it stages them through host
// memory and MPI, but for the all-to-all, which refuses. Every call below blocks but
// dist_sum_start's sums.
#ifndef MOE_DIST_H
#define MOE_DIST_H

#include <stddef.h>
#include <stdint.h>

#include "../kernels/kernels.h"

// Call first in main (after anything that re-executes the process), with main's
// arguments; dist_finalize before a normal exit.
void dist_init(int *argc, char ***argv);
void dist_finalize(void);

int dist_rank(void);
int dist_size(void);
// 1 on rank 0: the rank that prints and writes files.
int dist_lead(void);

// Which ranks a sum runs over (the groups: dist_split_expert_groups below).
typedef enum {
    DIST_ALL,              // every rank
    DIST_EXPERT_GROUP,     // the rank's expert group
    DIST_EXPERT_REPLICAS,  // the ranks holding the same experts as this one
} DistGroup;

// In-place sums over every rank (every rank gets the result).
void dist_sum_doubles(double *x, size_t n);
void dist_sum_i32(int32_t *x, size_t n);
void dist_sum_u64(uint64_t *x, size_t n);
// The largest of every rank's value.
int dist_max_int(int x);
// n `real` values of t (on be's device) summed over every rank, in place.
void dist_sum_tensor(const Backend *be, Tensor t, size_t n);
// 1 when this binary carries device tensors through NCCL (built with the CUDA backend).
int dist_has_nccl(void);
// 1 when sums of be's tensors do work: several ranks, or a GPU run under an MPI launcher
// (NCCL's one-rank communicator, so that one GPU checks the NCCL path).
int dist_sums(const Backend *be);

// Overlapped sums. dist_sum_start begins summing values [lo, lo + n) of t over group g's ranks
// (MPI_Iallreduce; NCCL on its own stream after the work issued so far) and returns;
// the values must not be read or written until dist_sum_wait. Every rank starts the same
// ranges in the same order. Nothing else in MPI advances a started sum while the caller
// computes (Open MPI runs no progress thread for non-blocking collectives): calling
// dist_progress (MPI_Testall) between pieces of work lets it move. dist_sum_wait returns
// when every started sum is done (device tensors: the device's later work waits for them).
// The sums are MPI_Allreduce's for the same range: the same bits for two ranks.
void dist_sum_start(DistGroup g, const Backend *be, Tensor t, size_t lo, size_t n);
void dist_progress(void);
void dist_sum_wait(void);
// Blocks, within group g of P ranks: its rank r (dist_group_rank) owns t's values
// [bounds[r], bounds[r+1]); bounds has P + 1 entries, bounds[0] = 0, and a block holds at
// most INT_MAX values.
// t's bounds[P] values summed over the group, of which this rank keeps its own block
// (the other blocks of t keep this rank's own values).
void dist_reduce_scatter_tensor(DistGroup g, const Backend *be, Tensor t, const size_t *bounds);
// Every member's block of t copied to every member.
void dist_allgather_tensor(DistGroup g, const Backend *be, Tensor t, const size_t *bounds);
// src's bounds[r+1] - bounds[r] values of each member r into dst's block r on the
// group's rank root (dst is not touched elsewhere).
void dist_gather_tensor(DistGroup g, const Backend *be, Tensor src, Tensor dst,
                        const size_t *bounds, int root);
// Expert-parallel groups: the ranks split into P / ep groups of ep consecutive ranks
// (group g: ranks g ep .. g ep + ep - 1); the all-to-alls below run within a rank's group,
// whose members it numbers 0 .. ep - 1 (its EP rank). Collective; ep divides P. Until
// called, the one group is every rank.
// The split also makes the expert replicas: the P / ep ranks of one EP rank, one in each
// group, which hold the same experts.
void dist_split_expert_groups(int ep);
int dist_ep_rank(void);
int dist_ep_size(void);
// This rank's place in group g and the group's size (0 and 1 without MPI).
int dist_group_rank(DistGroup g);
int dist_group_size(DistGroup g);

void dist_sum_doubles_in(DistGroup g, double *x, size_t n);
void dist_sum_tensor_in(DistGroup g, const Backend *be, Tensor t, size_t n);
// n values from this rank to rank dst, and on rank dst from rank src (host buffers of
// `real`; every send meets its receive, in order).
void dist_send_reals(const real *x, size_t n, int dst);
void dist_recv_reals(real *x, size_t n, int src);
// Within the expert group: every member sends n int32 values to every member: send
// (EP, n) in EP-rank order, recv (EP, n) from each member in order.
void dist_alltoall_i32(const int32_t *send, int32_t *recv, size_t n);
// Within the expert group: every member sends scount[q] values starting at send +
// sdispl[q] to EP rank q and receives rcount[q] values from EP rank q at recv + rdispl[q]
// (host buffers of `real`, counts in values, each below INT_MAX).
void dist_alltoallv_reals(const real *send, const size_t *scount, const size_t *sdispl,
                          real *recv, const size_t *rcount, const size_t *rdispl);
// The same exchange between tensors on be's device (counts and displacements on the host,
// exchanged beforehand): NCCL's grouped send/recv per peer on the GPU, MPI on the CPU.
void dist_alltoallv_tensor(const Backend *be, Tensor send, const size_t *scount,
                           const size_t *sdispl, Tensor recv, const size_t *rcount,
                           const size_t *rdispl);
// bytes of buf copied from rank root to every rank.
void dist_broadcast(void *buf, size_t bytes, int root);
void dist_barrier(void);

// Bytes this rank has sent through the collectives above since dist_init (for make
// bench-dist): the payload each call hands MPI, not the wire traffic of its algorithm.
uint64_t dist_bytes_sent(void);
// Wall seconds this rank has spent inside the collectives above (for overlapped sums: in
// dist_sum_start, dist_progress and the wait, i.e. the communication not hidden behind
// compute; NCCL's calls return once queued, so on a GPU this is the queueing time).
double dist_seconds(void);

#endif
