// attention_tiles_avx2.c: attention_tiles_body.h for x86-64-v3 (AVX2 + FMA): 16 vector
// registers hold 6 x 2 sums and the operands; FMA contraction as in the AVX-512 variant.
// Elsewhere (clang, other CPUs) the file has no instruction set of its own: it compiles
// the baseline's vectors, and attention.c never picks it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("arch=x86-64-v3")
#pragma GCC optimize("fp-contract=fast")
#define ATTN_VBYTES 32
#else
#define ATTN_VBYTES 16
#endif
#define ATTN_MR 6
#define ATTN_TILES_NAME attn_tiles_avx2
#define ATTN_TILES_LABEL "avx2"
#include "attention_tiles_body.h"
