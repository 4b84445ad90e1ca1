#include "zero.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../dist/dist.h"

// Block r ends where the running count of trainable values reaches (r+1)/P of them, so
// each rank updates about the same number; a tensor may straddle two blocks.
static void cut_blocks(Zero *z, size_t slab) {
    const int P = z->P;
    size_t trainable = 0;
    for (size_t i = 0; i < z->n_groups; i++)
        if (z->groups[i].trainable) trainable += z->groups[i].numel;
    z->bounds = CALLOC((size_t)P + 1, sizeof *z->bounds);
    z->state_bounds = CALLOC((size_t)P + 1, sizeof *z->state_bounds);
    for (int r = 1; r < P; r++) {
        size_t want = trainable * (size_t)r / (size_t)P, seen = 0, at = 0;
        for (size_t i = 0; i < z->n_groups; i++) {
            const ParamGroup *g = &z->groups[i];
            if (!g->trainable) continue;
            at = g->offset + g->numel;
            if (seen + g->numel >= want) {
                at = g->offset + (want - seen);
                break;
            }
            seen += g->numel;
        }
        z->bounds[r] = at > z->bounds[r - 1] ? at : z->bounds[r - 1];
        z->state_bounds[r] = want;
    }
    z->bounds[P] = slab;
    z->state_bounds[P] = trainable;
}

// The trainable part of group g inside [lo, hi), or numel 0.
static ParamGroup clip_group(const ParamGroup *g, size_t lo, size_t hi) {
    ParamGroup c = *g;
    size_t a = g->offset > lo ? g->offset : lo, b = g->offset + g->numel < hi ? g->offset + g->numel : hi;
    c.offset = a;
    c.numel = g->trainable && b > a ? b - a : 0;
    return c;
}

void zero_init(Zero *z, AdamW *shard, const OptimConfig *cfg, const ParamGroup *groups,
               const uint8_t *expert, size_t n_groups, const Backend *be) {
    memset(z, 0, sizeof *z);
    z->cfg = *cfg;
    z->be = be;
    z->n_groups = n_groups;
    z->ep = expert ? dist_ep_size() : 1;
    z->group = z->ep > 1 ? DIST_EXPERT_REPLICAS : DIST_ALL;
    z->P = dist_group_size(z->group);
    z->rank = dist_group_rank(z->group);
    z->groups = CALLOC(n_groups, sizeof *z->groups);
    memcpy(z->groups, groups, n_groups * sizeof *groups);
    z->expert = CALLOC(n_groups, 1);
    if (expert) memcpy(z->expert, expert, n_groups);
    size_t slab = 0;
    for (size_t i = 0; i < n_groups; i++)
        if (groups[i].offset + groups[i].numel > slab) slab = groups[i].offset + groups[i].numel;
    cut_blocks(z, slab);
    // Every value trains (groups tile the slab, none frozen): the packed order is the
    // slab's own, so the collectives run on the slab where it lives.
    size_t trainable = z->state_bounds[z->P];
    z->in_place = trainable == slab;
    if (!z->in_place) z->packed = CALLOC(trainable ? trainable : 1, sizeof *z->packed);
    z->mine = CALLOC(n_groups, sizeof *z->mine);
    z->mine_expert = CALLOC(n_groups, 1);
    for (size_t i = 0; i < n_groups; i++) {
        ParamGroup c = clip_group(&groups[i], z->bounds[z->rank], z->bounds[z->rank + 1]);
        if (!c.numel) continue;
        z->mine_expert[z->n_mine] = z->expert[i];
        z->mine[z->n_mine++] = c;
    }
    adamw_init(shard, cfg, z->mine, z->n_mine, be);
    CHECK(shard->n_trainable == z->state_bounds[z->rank + 1] - z->state_bounds[z->rank],
          "zero: block %d holds %zu trainable values, its state range %zu", z->rank,
          shard->n_trainable, z->state_bounds[z->rank + 1] - z->state_bounds[z->rank]);
}

void zero_free(Zero *z) {
    free(z->bounds);
    free(z->state_bounds);
    free(z->groups);
    free(z->expert);
    free(z->mine);
    free(z->mine_expert);
    free(z->packed);
    memset(z, 0, sizeof *z);
}

// Packed values [lo, hi) (the trainable values in slab order) between slab and z->packed:
// to the buffer when out, else back into the slab.
static void move_packed(const Zero *z, Tensor slab, size_t lo, size_t hi, int out) {
    size_t at = 0;   // packed position of group i's first value
    for (size_t i = 0; i < z->n_groups && at < hi; i++) {
        const ParamGroup *g = &z->groups[i];
        if (!g->trainable) continue;
        size_t a = at > lo ? at : lo, b = at + g->numel < hi ? at + g->numel : hi;
        if (b > a) {
            Tensor t = tensor_slice(slab, g->offset + (a - at), b - a);
            if (out) z->be->download(z->packed + a, t, (b - a) * sizeof *z->packed);
            else z->be->upload(t, z->packed + a, (b - a) * sizeof *z->packed);
        }
        at += g->numel;
    }
}

// Under expert parallelism the dense tensors' gradients are first summed within the
// expert group (its ranks hold different experts but the same dense tensors); the
// reduce-scatter over the replicas then completes the sum over every rank.
static void sum_dense_in_group(const Zero *z, Tensor grads) {
    for (size_t i = 0; i < z->n_groups;) {
        if (z->expert[i] || !z->groups[i].trainable) {
            i++;
            continue;
        }
        size_t lo = z->groups[i].offset, hi = lo;
        for (; i < z->n_groups && !z->expert[i] && z->groups[i].trainable &&
               z->groups[i].offset == hi; i++)
            hi += z->groups[i].numel;
        dist_sum_start(DIST_EXPERT_GROUP, z->be, grads, lo, hi - lo);
    }
    dist_sum_wait();
}

// The global norm from this rank's block of the summed gradients.
static double block_norm(const Zero *z, const AdamW *shard, Tensor grads, double grad_scale) {
    if (z->ep == 1) {
        double local = adamw_grad_norm(shard, grads, grad_scale), sq = local * local;
        dist_sum_doubles(&sq, 1);
        return sqrt(sq);
    }
    // Each expert group's replicas hold one copy of the dense blocks between them, each
    // routed expert has one owner in all: over every rank the dense squares come ep
    // times. Summed over every rank, the norm is the same bits on every rank.
    double sq[2] = {0.0, 0.0};   // dense tensors, routed experts
    for (size_t i = 0; i < z->n_mine; i++)
        sq[z->mine_expert[i]] += z->be->sum_squares(
            tensor_slice(grads, z->mine[i].offset, z->mine[i].numel), z->mine[i].numel);
    dist_sum_doubles(sq, 2);
    return sqrt(sq[0] / z->ep + sq[1]) * fabs(grad_scale);
}

// The global norm, then the update of this rank's block (the norm, not finite: none).
static double update_block(const Zero *z, AdamW *shard, Tensor params, Tensor grads,
                           double lr_now, long step, double grad_scale) {
    double norm = block_norm(z, shard, grads, grad_scale);
    if (isfinite(norm)) adamw_apply(shard, params, grads, lr_now, step, grad_scale, norm);
    return norm;
}

double zero_step(Zero *z, AdamW *shard, Tensor params, Tensor grads, double lr_now, long step,
                 double grad_scale) {
    const size_t *sb = z->state_bounds, n = sb[z->P];
    const int r = z->rank;
    if (z->ep > 1) sum_dense_in_group(z, grads);
    if (z->in_place) {   // the backend's tensors themselves: NCCL's on a GPU
        dist_reduce_scatter_tensor(z->group, z->be, grads, z->bounds);
        double norm = update_block(z, shard, params, grads, lr_now, step, grad_scale);
        if (isfinite(norm)) dist_allgather_tensor(z->group, z->be, params, z->bounds);
        return norm;
    }
    Tensor packed = {z->packed, DTYPE_REAL, DEVICE_CPU, n};   // (n) trainable values
    move_packed(z, grads, 0, n, 1);
    dist_reduce_scatter_tensor(z->group, z->be, packed, sb);
    move_packed(z, grads, sb[r], sb[r + 1], 0);
    double norm = update_block(z, shard, params, grads, lr_now, step, grad_scale);
    if (!isfinite(norm)) return norm;
    move_packed(z, params, sb[r], sb[r + 1], 1);
    dist_allgather_tensor(z->group, z->be, packed, sb);
    move_packed(z, params, 0, n, 0);
    return norm;
}

void zero_full_init(const Zero *z, AdamW *full) {
    adamw_init(full, &z->cfg, z->groups, z->n_groups, z->be);
}

void zero_gather(const Zero *z, const AdamW *shard, AdamW *full) {
    memset(full, 0, sizeof *full);   // only the group's first rank holds the state, and only now
    if (z->rank == 0) zero_full_init(z, full);
    dist_gather_tensor(z->group, z->be, shard->m, full->m, z->state_bounds, 0);
    dist_gather_tensor(z->group, z->be, shard->v, full->v, z->state_bounds, 0);
}

void zero_take(const Zero *z, AdamW *shard, const AdamW *full) {
    size_t lo = z->state_bounds[z->rank], n = shard->n_trainable;
    if (n == 0) return;
    real *host = CALLOC(n, sizeof *host);   // (n) one moment at a time
    z->be->download(host, tensor_slice(full->m, lo, n), n * sizeof *host);
    z->be->upload(shard->m, host, n * sizeof *host);
    z->be->download(host, tensor_slice(full->v, lo, n), n * sizeof *host);
    z->be->upload(shard->v, host, n * sizeof *host);
    free(host);
}
