// attention_tiles_base.c: attention_tiles_body.h for any CPU (on x86-64, SSE2's 16-byte
// vectors and 16 registers), compiled with the build's flags.
#define ATTN_VBYTES 16
#define ATTN_MR 4
#define ATTN_TILES_NAME attn_tiles_base
#define ATTN_TILES_LABEL "base"
#include "attention_tiles_body.h"
