// attention_tiles_avx512.c: attention_tiles_body.h for x86-64-v4 (AVX-512): 32 vector
// registers hold 8 x 2 sums and the operands. FMA contraction is on for this code alone:
// the tiles' sums are ours to order, and a fused multiply-add rounds once instead of twice.
// Elsewhere (clang, other CPUs) the file has no instruction set of its own: it compiles
// the baseline's vectors, and attention.c never picks it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("arch=x86-64-v4")
#pragma GCC optimize("fp-contract=fast")
#define ATTN_VBYTES 64
#else
#define ATTN_VBYTES 16
#endif
#define ATTN_MR 8
#define ATTN_TILES_NAME attn_tiles_avx512
#define ATTN_TILES_LABEL "avx512"
#include "attention_tiles_body.h"
