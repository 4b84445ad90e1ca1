// sdpa_cudnn.h: cuDNN's fused scaled-dot-product attention (flash attention) for the
// attention ops of the CUDA backend (attention.cu), as plain host calls.
//
// Defines: the shape SdpaDims and the plan / forward / backward calls of sdpa_cudnn.cpp.
// Host C++ only (g++ builds it: the frontend's headers are heavy for nvcc), no kernels.
// Causal, grouped-query (H query heads share KV heads), scale 1/sqrt(D); bf16 in and out,
// fp32 softmax and accumulation.
//
// Layout (the attention ops' own, kernels.h): qkv16 (B*T, W) bf16, W = (H+2KV)*D, holds per
// row the H query heads, then KV key heads, then KV value heads; o16 and do16 (B*T, H*D);
// stats (B*H*T) fp32, the logsumexp of each query's scores, the forward's only state.
#ifndef MOE_SDPA_CUDNN_H
#define MOE_SDPA_CUDNN_H

#include <stddef.h>

struct SdpaDims {
    size_t B, T, H, KV, D;
};

// 1 when cuDNN plans this shape on device 0 (libcudnn opened on the first call; plans built
// once per shape and cached), with the workspace bytes each pass needs; 0 with the reason
// (no libcudnn, an unsupported shape or device) in err.
int sdpa_cudnn_plan(const SdpaDims *s, size_t *fwd_ws, size_t *bwd_ws, char *err, size_t n);

// o16 = attention(qkv16), stats = logsumexp per query. NULL on success, else cuDNN's
// message (valid until the next call). s must have been planned.
const char *sdpa_cudnn_forward(const SdpaDims *s, const void *qkv16, void *o16, float *stats,
                               void *workspace);

// dqkv16 (B*T, W) = the gradient of every head (written, not accumulated), from the
// forward's o16 and stats and the output gradient do16.
const char *sdpa_cudnn_backward(const SdpaDims *s, const void *qkv16, const void *o16,
                                const void *do16, const float *stats, void *dqkv16,
                                void *workspace);

#endif
