#include "zero.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "../dist/dist.h"

// Block r of part p ends where the running count of its trainable values reaches (r+1)/P
// of them, so each rank updates about the same number; a tensor may straddle two blocks.
static void cut_blocks(const Zero *z, ZeroPart *p, size_t slab) {
    const int P = p->P;
    size_t trainable = 0;
    for (size_t k = 0; k < p->n_groups; k++)
        if (z->groups[p->index[k]].trainable) trainable += z->groups[p->index[k]].numel;
    p->bounds = CALLOC((size_t)P + 1, sizeof *p->bounds);
    p->state_bounds = CALLOC((size_t)P + 1, sizeof *p->state_bounds);
    for (int r = 1; r < P; r++) {
        size_t want = trainable * (size_t)r / (size_t)P, seen = 0, at = 0;
        for (size_t k = 0; k < p->n_groups; k++) {
            const ParamGroup *g = &z->groups[p->index[k]];
            if (!g->trainable) continue;
            at = g->offset + g->numel;
            if (seen + g->numel >= want) {
                at = g->offset + (want - seen);
                break;
            }
            seen += g->numel;
        }
        p->bounds[r] = at > p->bounds[r - 1] ? at : p->bounds[r - 1];
        p->state_bounds[r] = want;
    }
    p->bounds[P] = slab;
    p->state_bounds[P] = trainable;
}

// The trainable part of group g inside [lo, hi), or numel 0.
static ParamGroup clip_group(const ParamGroup *g, size_t lo, size_t hi) {
    ParamGroup c = *g;
    size_t end = g->offset + g->numel;
    size_t a = g->offset > lo ? g->offset : lo, b = end < hi ? end : hi;
    c.offset = a;
    c.numel = g->trainable && b > a ? b - a : 0;
    return c;
}

// Part k: every group (expert NULL) or those whose flag is k, over group g's ranks; its
// pieces of this rank's block appended to mine (n_mine), the shard's groups.
static void part_init(Zero *z, int k, DistGroup g, const uint8_t *expert, size_t slab,
                      ParamGroup *mine, size_t *n_mine) {
    ZeroPart *p = &z->parts[k];
    p->group = g;
    p->P = dist_group_size(g);
    p->rank = dist_group_rank(g);
    p->index = CALLOC(z->n_groups ? z->n_groups : 1, sizeof *p->index);
    for (size_t i = 0; i < z->n_groups; i++)
        if (!expert || expert[i] == k) p->index[p->n_groups++] = i;
    cut_blocks(z, p, slab);
    // Every value trains (the part's groups tile the slab, none frozen): the packed order is
    // the slab's own, so the collectives run on the slab where it lives. A one-rank part
    // sends nothing.
    size_t trainable = p->state_bounds[p->P], held = 0;
    p->in_place = trainable == slab;
    for (size_t m = 0; m < *n_mine; m++) p->shard_at += mine[m].numel;   // the parts before
    if (!p->in_place && p->P > 1) p->packed = CALLOC(trainable ? trainable : 1, sizeof *p->packed);
    for (size_t j = 0; j < p->n_groups; j++) {
        ParamGroup c = clip_group(&z->groups[p->index[j]], p->bounds[p->rank],
                                  p->bounds[p->rank + 1]);
        if (!c.numel) continue;
        mine[(*n_mine)++] = c;
        held += c.numel;
    }
    CHECK(held == p->state_bounds[p->rank + 1] - p->state_bounds[p->rank],
          "zero: block %d holds %zu trainable values, its state range %zu", p->rank, held,
          p->state_bounds[p->rank + 1] - p->state_bounds[p->rank]);
}

void zero_init(Zero *z, AdamW *shard, const OptimConfig *cfg, const ParamGroup *groups,
               const uint8_t *expert, size_t n_groups, const Backend *be) {
    memset(z, 0, sizeof *z);
    z->cfg = *cfg;
    z->be = be;
    z->n_groups = n_groups;
    z->groups = CALLOC(n_groups ? n_groups : 1, sizeof *z->groups);
    memcpy(z->groups, groups, n_groups * sizeof *groups);
    size_t slab = 0;
    for (size_t i = 0; i < n_groups; i++)
        if (groups[i].offset + groups[i].numel > slab) slab = groups[i].offset + groups[i].numel;
    // The shard's groups: each part's pieces in slab order, part after part (a group lies
    // in one part, and in one piece of it).
    ParamGroup *mine = CALLOC(n_groups ? n_groups : 1, sizeof *mine);
    size_t n_mine = 0;
    z->n_parts = expert ? 2 : 1;
    part_init(z, 0, DIST_ALL, expert, slab, mine, &n_mine);
    if (expert) part_init(z, 1, DIST_EXPERT_REPLICAS, expert, slab, mine, &n_mine);
    adamw_init(shard, cfg, mine, n_mine, be);
    free(mine);
}

void zero_free(Zero *z) {
    for (int k = 0; k < z->n_parts; k++) {
        free(z->parts[k].index);
        free(z->parts[k].bounds);
        free(z->parts[k].state_bounds);
        free(z->parts[k].packed);
    }
    free(z->groups);
    memset(z, 0, sizeof *z);
}

// Part p's trainable values [lo, hi), in order, between base and host (hi - lo): to host
// when out, else back into base. base is the slab (full NULL) or one of full's moments.
static void move_packed(const Zero *z, const ZeroPart *p, Tensor base, const AdamW *full,
                        real *host, size_t lo, size_t hi, int out) {
    size_t at = 0;   // packed position of the group's first value
    for (size_t k = 0; k < p->n_groups && at < hi; k++) {
        size_t i = p->index[k];
        const ParamGroup *g = &z->groups[i];
        if (!g->trainable) continue;
        size_t a = at > lo ? at : lo, b = at + g->numel < hi ? at + g->numel : hi;
        if (b > a) {
            size_t start = full ? full->state_offset[i] : g->offset;
            Tensor t = tensor_slice(base, start + (a - at), b - a);
            if (out) z->be->download(host + (a - lo), t, (b - a) * sizeof *host);
            else z->be->upload(t, host + (a - lo), (b - a) * sizeof *host);
        }
        at += g->numel;
    }
}

// Part p's gradients summed over its ranks into this rank's block.
static void scatter_grads(const Zero *z, const ZeroPart *p, Tensor grads) {
    const size_t *sb = p->state_bounds, n = sb[p->P];
    const int r = p->rank;
    if (p->P == 1) return;
    if (p->in_place) {   // the backend's tensor itself: NCCL's on a GPU
        dist_reduce_scatter_tensor(p->group, z->be, grads, p->bounds);
        return;
    }
    Tensor packed = {p->packed, DTYPE_REAL, DEVICE_CPU, n};   // (n) trainable values
    move_packed(z, p, grads, NULL, p->packed, 0, n, 1);
    dist_reduce_scatter_tensor(p->group, z->be, packed, sb);
    move_packed(z, p, grads, NULL, p->packed + sb[r], sb[r], sb[r + 1], 0);
}

// Every rank's updated block of part p to every rank.
static void gather_params(const Zero *z, const ZeroPart *p, Tensor params) {
    const size_t *sb = p->state_bounds, n = sb[p->P];
    const int r = p->rank;
    if (p->P == 1) return;
    if (p->in_place) {
        dist_allgather_tensor(p->group, z->be, params, p->bounds);
        return;
    }
    Tensor packed = {p->packed, DTYPE_REAL, DEVICE_CPU, n};
    move_packed(z, p, params, NULL, p->packed + sb[r], sb[r], sb[r + 1], 1);
    dist_allgather_tensor(p->group, z->be, packed, sb);
    move_packed(z, p, params, NULL, p->packed, 0, n, 0);
}

double zero_step(Zero *z, AdamW *shard, Tensor params, Tensor grads, double lr_now, long step,
                 double grad_scale) {
    for (int k = 0; k < z->n_parts; k++) scatter_grads(z, &z->parts[k], grads);
    // Every trainable value is in one rank's block: the squares summed over every rank.
    double local = adamw_grad_norm(shard, grads, grad_scale), sq = local * local;
    dist_sum_doubles(&sq, 1);
    double norm = sqrt(sq);
    if (!isfinite(norm)) return norm;
    adamw_apply(shard, params, grads, lr_now, step, grad_scale, norm);
    for (int k = 0; k < z->n_parts; k++) gather_params(z, &z->parts[k], params);
    return norm;
}

void zero_full_init(const Zero *z, AdamW *full) {
    adamw_init(full, &z->cfg, z->groups, z->n_groups, z->be);
}

// Part p's moments onto its group's first rank, into full's state. One part holds every
// tensor over every rank (P > 1): its values in order are full's state itself.
static void gather_part(const Zero *z, const ZeroPart *p, const AdamW *shard, AdamW *full) {
    const size_t *sb = p->state_bounds, n = sb[p->P], mine = sb[p->rank + 1] - sb[p->rank];
    const int direct = z->n_parts == 1;
    real *host = p->rank == 0 && !direct ? CALLOC(n ? n : 1, sizeof *host) : NULL;   // (n)
    for (int v = 0; v < 2; v++) {
        Tensor src = tensor_slice(v ? shard->v : shard->m, p->shard_at, mine);
        Tensor whole = v ? full->v : full->m;
        Tensor dst = direct ? whole : (Tensor){host, DTYPE_REAL, DEVICE_CPU, n};
        if (p->P > 1) dist_gather_tensor(p->group, z->be, src, dst, sb, 0);
        else if (mine) z->be->download(host, src, mine * sizeof *host);   // its own: the whole
        if (host) move_packed(z, p, whole, full, host, 0, n, 0);
    }
    free(host);
}

void zero_gather(const Zero *z, const AdamW *shard, AdamW *full) {
    memset(full, 0, sizeof *full);   // only the parts' first ranks hold the state, and only now
    int first = 0;
    for (int k = 0; k < z->n_parts; k++) first |= z->parts[k].rank == 0;
    if (first) zero_full_init(z, full);
    for (int k = 0; k < z->n_parts; k++) gather_part(z, &z->parts[k], shard, full);
}

void zero_take(const Zero *z, AdamW *shard, const AdamW *full) {
    for (int k = 0; k < z->n_parts; k++) {
        const ZeroPart *p = &z->parts[k];
        size_t lo = p->state_bounds[p->rank], n = p->state_bounds[p->rank + 1] - lo;
        if (n == 0) continue;
        real *host = CALLOC(n, sizeof *host);   // (n) one moment at a time
        for (int v = 0; v < 2; v++) {
            move_packed(z, p, v ? full->v : full->m, full, host, lo, lo + n, 1);
            z->be->upload(tensor_slice(v ? shard->v : shard->m, p->shard_at, n), host,
                          n * sizeof *host);
        }
        free(host);
    }
}
