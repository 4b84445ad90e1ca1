// attention_tiles.h: the fused causal attention's per-head work (CPU), compiled once per
// instruction set.
//
// attention.c shares heads out over threads; for one head, the functions here walk blocks
// of ATTN_BQ queries and, within each, blocks of at most ATTN_BK keys that stop at the
// diagonal, with an online softmax: no (T, T) probabilities are kept, one logsumexp per
// query is, and the backward recomputes each block's probabilities from it. The products
// inside a block are register-tiled loops over the compiler's vector type rather than
// BLAS calls: with head widths of 32 to 128 a BLAS call packs both operands for a product
// of a few hundred thousand FLOPs, and its packing and call overhead cost as much as the
// product (make bench's attention core ran at a third of the sgemm peak). The tiles also
// skip the masked half of each diagonal block, tile by tile.
//
// attention_tiles_body.h holds the code, written once; attention_tiles_{avx512,avx2,
// base}.c compile it for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline,
// each with its vector width and tile height, and attention.c picks the widest one the CPU
// runs. Every variant sums in a fixed order that depends on the shapes alone, so a result
// does not depend on the thread count; variants differ from each other in rounding.
#ifndef MOE_CPU_ATTENTION_TILES_H
#define MOE_CPU_ATTENTION_TILES_H

#include "../kernels.h"

// Queries per block, and keys per block: T <= ATTN_BK (tiny, small) is one key block.
#define ATTN_BQ 64
#define ATTN_BK 256
// Padded widths are multiples of ATTN_PAD values: two vectors of the widest variant.
#define ATTN_PAD (128 / sizeof(real))

// One head's q, k, v rows step `width` values, out and dout rows `out_width`; q and k are
// Dk wide, v and out Dv (MLA: Dk != Dv).
typedef struct {
    const real *q, *k, *v;
    size_t T, Dk, Dv, width, out_width;
    real scale;
} HeadView;

// A thread's scratch, made by attn_scratch_init for T positions and head widths Dk, Dv;
// pad(n) rounds n up to a multiple of ATTN_PAD, and every padding holds zeros.
typedef struct {
    real *s, *ds;          // (ATTN_BQ, ATTN_BK) scores / probabilities, their gradient
    real *kt, *vt;         // (Dk, pad(T)), (Dv, pad(T)): the head's k and v transposed
    real *rows_k, *rows_v; // (T, pad(Dk)), (T, pad(Dv)): the head's k and v rows
    real *acc_dk, *acc_dv; // (T, pad(Dk)), (T, pad(Dv)): the head's dk and dv, summing
    real *rows_q;          // (ATTN_BQ, pad(Dk)): a query block's q rows
    real *rows_dout;       // (ATTN_BQ, pad(Dv)): a query block's dout rows
    real *m, *l;           // (ATTN_BQ) running maximum and sum per query
} AttnScratch;

void attn_scratch_init(AttnScratch *ws, size_t T, size_t Dk, size_t Dv);
void attn_scratch_free(AttnScratch *ws);

// forward_head: out rows (T, Dv) = softmax(q k^T scale, causal) v, lse (T) its logsumexp.
// backward_head: adds dq, dk, dv (rows as in the view) from dout, the forward's lse and
// delta (T) = rowsum(dout * out).
typedef struct {
    const char *name;
    void (*forward_head)(real *out, real *lse, const HeadView *h, AttnScratch *ws);
    void (*backward_head)(real *dq, real *dk, real *dv, const HeadView *h, const real *dout,
                          const real *lse, const real *delta, AttnScratch *ws);
} AttnTiles;

extern const AttnTiles attn_tiles_avx512, attn_tiles_avx2, attn_tiles_base;

#endif
