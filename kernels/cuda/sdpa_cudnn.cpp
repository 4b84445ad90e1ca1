// sdpa_cudnn.cpp: cuDNN's fused attention through cuDNN's C++ frontend (header-only, from
// PyPI's nvidia-cudnn-frontend, see the Makefile). libcudnn is opened at run time (the
// frontend's dynamic loading), so CPU runs and fp32 runs never load it.
//
// Q, K and V are strided views of the one bf16 qkv buffer, (B, heads, T, D) with strides
// (T*W, D, W, 1); O, dO likewise over rows of H*D. The forward keeps the softmax statistics
// (B, H, T, 1) in place of the probabilities; the backward recomputes those from Q, K, V.
#include "sdpa_cudnn.h"

#include <stdio.h>

#ifdef MOE_CUDNN_FE

#include <cuda_runtime_api.h>
#include <cudnn_frontend.h>
#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace fe = cudnn_frontend;

// The frontend's dynamic loading looks every cuDNN symbol up in this handle.
namespace cudnn_frontend {
void *cudnn_dlhandle = nullptr;
}

namespace {

enum : int64_t { UID_Q = 1, UID_K, UID_V, UID_O, UID_STATS, UID_DO, UID_DQ, UID_DK, UID_DV };

typedef std::shared_ptr<fe::graph::Tensor_attributes> TensorAttr;

struct Plans {
    SdpaDims dims;
    std::string why; // empty: supported
    std::shared_ptr<fe::graph::Graph> fwd, bwd;
    int64_t fwd_ws = 0, bwd_ws = 0; // workspace bytes
};

cudnnHandle_t g_handle;
std::string g_open_error; // non-empty: cuDNN cannot be used at all
bool g_opened;
std::vector<Plans> g_plans; // one per shape seen (a run has one, sampling adds another)
std::string g_message;      // the last execution error

bool cudnn_open() {
    if (g_opened) return g_open_error.empty();
    g_opened = true;
    // The frontend opens libcudart itself, trying .12 before .13: name the runtime this
    // binary links, so both reach the same one.
    char cudart[32];
    snprintf(cudart, sizeof cudart, "libcudart.so.%d", CUDART_VERSION / 1000);
    setenv("CUDNN_FRONTEND_CUDART_LIB_NAME", cudart, 0);
    fe::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_LOCAL);
    if (!fe::cudnn_dlhandle) {
        const char *e = dlerror();
        g_open_error = std::string("libcudnn.so.9 cannot be loaded: ") + (e ? e : "?");
        return false;
    }
    try {
        if (fe::detail::create_handle(&g_handle) != CUDNN_STATUS_SUCCESS)
            g_open_error = "cudnnCreate failed";
    } catch (const std::exception &e) {
        g_open_error = std::string("cudnnCreate: ") + e.what();
    }
    return g_open_error.empty();
}

struct View {
    int64_t heads, width; // heads in this view, values per row of its buffer
};

void shape_view(fe::graph::Tensor_attributes &t, const SdpaDims &s, View v) {
    int64_t T = (int64_t)s.T, D = (int64_t)s.D;
    t.set_dim({(int64_t)s.B, v.heads, T, D}).set_stride({T * v.width, D, v.width, 1});
}

TensorAttr input(fe::graph::Graph &g, const char *name, int64_t uid, const SdpaDims &s,
                 View v) {
    fe::graph::Tensor_attributes t;
    t.set_name(name).set_uid(uid);
    shape_view(t, s, v);
    return g.tensor(t);
}

void output(const TensorAttr &t, int64_t uid, const SdpaDims &s, View v) {
    t->set_output(true).set_uid(uid);
    shape_view(*t, s, v);
}

void shape_stats(fe::graph::Tensor_attributes &t, const SdpaDims &s) {
    int64_t H = (int64_t)s.H, T = (int64_t)s.T;
    t.set_uid(UID_STATS)
        .set_dim({(int64_t)s.B, H, T, 1})
        .set_stride({H * T, T, 1, 1})
        .set_data_type(fe::DataType_t::FLOAT);
}

std::shared_ptr<fe::graph::Graph> new_graph() {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return g;
}

float attn_scale(const SdpaDims &s) { return (float)(1.0 / sqrt((double)s.D)); }

// The three input views of qkv: queries, then keys, then values.
struct Qkv {
    TensorAttr q, k, v;
};

Qkv qkv_inputs(fe::graph::Graph &g, const SdpaDims &s) {
    int64_t W = (int64_t)((s.H + 2 * s.KV) * s.D);
    return {input(g, "Q", UID_Q, s, {(int64_t)s.H, W}),
            input(g, "K", UID_K, s, {(int64_t)s.KV, W}),
            input(g, "V", UID_V, s, {(int64_t)s.KV, W})};
}

std::shared_ptr<fe::graph::Graph> forward_graph(const SdpaDims &s) {
    auto g = new_graph();
    Qkv in = qkv_inputs(*g, s);
    auto opts = fe::graph::SDPA_attributes()
                    .set_name("sdpa")
                    .set_generate_stats(true)
                    .set_causal_mask(true)
                    .set_attn_scale(attn_scale(s));
    auto [o, stats] = g->sdpa(in.q, in.k, in.v, opts);
    output(o, UID_O, s, {(int64_t)s.H, (int64_t)(s.H * s.D)});
    stats->set_output(true);
    shape_stats(*stats, s);
    return g;
}

std::shared_ptr<fe::graph::Graph> backward_graph(const SdpaDims &s) {
    auto g = new_graph();
    Qkv in = qkv_inputs(*g, s);
    View heads = {(int64_t)s.H, (int64_t)(s.H * s.D)};
    auto o = input(*g, "O", UID_O, s, heads);
    auto dout = input(*g, "dO", UID_DO, s, heads);
    fe::graph::Tensor_attributes st;
    st.set_name("stats");
    shape_stats(st, s);
    auto stats = g->tensor(st);
    auto opts = fe::graph::SDPA_backward_attributes()
                    .set_name("sdpa_backward")
                    .set_deterministic_algorithm(true) // resume must be bit-identical
                    .set_causal_mask(true)
                    .set_attn_scale(attn_scale(s));
    auto [dq, dk, dv] = g->sdpa_backward(in.q, in.k, in.v, o, dout, stats, opts);
    int64_t W = (int64_t)((s.H + 2 * s.KV) * s.D);
    output(dq, UID_DQ, s, {(int64_t)s.H, W});
    output(dk, UID_DK, s, {(int64_t)s.KV, W});
    output(dv, UID_DV, s, {(int64_t)s.KV, W});
    return g;
}

// "" when g builds for this device, else what cuDNN said.
std::string build_graph(fe::graph::Graph &g, int64_t *ws) {
    fe::error_t built = g.build(g_handle, {fe::HeurMode_t::A});
    if (!built.is_good()) return built.get_message();
    fe::error_t sized = g.get_workspace_size(*ws);
    return sized.is_good() ? "" : sized.get_message();
}

Plans make_plans(const SdpaDims &s) {
    Plans p;
    p.dims = s;
    if (!cudnn_open()) {
        p.why = g_open_error;
        return p;
    }
    try {
        p.fwd = forward_graph(s);
        p.why = build_graph(*p.fwd, &p.fwd_ws);
        if (p.why.empty()) {
            p.bwd = backward_graph(s);
            p.why = build_graph(*p.bwd, &p.bwd_ws);
        }
    } catch (const std::exception &e) {
        p.why = e.what();
    }
    if (p.why.empty() && (p.fwd_ws < 0 || p.bwd_ws < 0)) p.why = "negative workspace size";
    return p;
}

bool same_dims(const SdpaDims &a, const SdpaDims &b) {
    return a.B == b.B && a.T == b.T && a.H == b.H && a.KV == b.KV && a.D == b.D;
}

const Plans &plans_for(const SdpaDims &s) {
    for (const Plans &p : g_plans)
        if (same_dims(p.dims, s)) return p;
    g_plans.push_back(make_plans(s));
    return g_plans.back();
}

const char *run(const std::shared_ptr<fe::graph::Graph> &g,
                std::unordered_map<int64_t, void *> &ptrs, void *workspace) {
    try {
        fe::error_t st = g->execute(g_handle, ptrs, workspace);
        if (st.is_good()) return nullptr;
        g_message = st.get_message();
    } catch (const std::exception &e) {
        g_message = e.what();
    }
    return g_message.c_str();
}

} // namespace

int sdpa_cudnn_plan(const SdpaDims *s, size_t *fwd_ws, size_t *bwd_ws, char *err, size_t n) {
    const Plans &p = plans_for(*s);
    if (!p.why.empty()) {
        snprintf(err, n, "%s", p.why.c_str());
        return 0;
    }
    *fwd_ws = (size_t)p.fwd_ws;
    *bwd_ws = (size_t)p.bwd_ws;
    return 1;
}

const char *sdpa_cudnn_forward(const SdpaDims *s, const void *qkv16, void *o16, float *stats,
                               void *workspace) {
    const Plans &p = plans_for(*s);
    if (!p.why.empty()) return p.why.c_str();
    const char *q = (const char *)qkv16; // bf16: 2 bytes per value
    size_t head = s->D * 2;
    std::unordered_map<int64_t, void *> ptrs = {{UID_Q, (void *)q},
                                                {UID_K, (void *)(q + s->H * head)},
                                                {UID_V, (void *)(q + (s->H + s->KV) * head)},
                                                {UID_O, o16},
                                                {UID_STATS, stats}};
    return run(p.fwd, ptrs, workspace);
}

const char *sdpa_cudnn_backward(const SdpaDims *s, const void *qkv16, const void *o16,
                                const void *do16, const float *stats, void *dqkv16,
                                void *workspace) {
    const Plans &p = plans_for(*s);
    if (!p.why.empty()) return p.why.c_str();
    const char *q = (const char *)qkv16;
    char *dq = (char *)dqkv16;
    size_t head = s->D * 2, k_at = s->H * head, v_at = (s->H + s->KV) * head;
    std::unordered_map<int64_t, void *> ptrs = {
        {UID_Q, (void *)q},   {UID_K, (void *)(q + k_at)}, {UID_V, (void *)(q + v_at)},
        {UID_O, (void *)o16}, {UID_DO, (void *)do16},      {UID_STATS, (void *)stats},
        {UID_DQ, dq},         {UID_DK, dq + k_at},         {UID_DV, dq + v_at}};
    return run(p.bwd, ptrs, workspace);
}

#else // built without the frontend's headers: attention keeps the plain kernels

int sdpa_cudnn_plan(const SdpaDims *, size_t *, size_t *, char *err, size_t n) {
    snprintf(err, n,
             "this build has no cuDNN frontend headers (the Makefile fetches them "
             "from PyPI: rebuild with network access)");
    return 0;
}

const char *sdpa_cudnn_forward(const SdpaDims *, const void *, void *, float *, void *) {
    return "this build has no cuDNN fused attention";
}

const char *sdpa_cudnn_backward(const SdpaDims *, const void *, const void *, const void *,
                                const float *, void *, void *) {
    return "this build has no cuDNN fused attention";
}

#endif
