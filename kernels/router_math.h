// router_math.h: the router's per-row arithmetic, written once for both backends.
//
// Defines MOE_TOPK_MAX (the largest top-k any router takes) and `static inline` functions
// on one row or one value: stable sigmoid and softplus, the normal CDF and PDF, softmax,
// log-sum-exp, top-k (plain or group-limited), gates, row normalisation, the CV^2 spread,
// the Shazeer load term, the hash-routing mix. kernels/cpu/ and kernels/cuda/ both include it, so the CPU ops
// and the CUDA kernels run the same operations in the same order and types, and a change
// to one backend's row math cannot leave the other computing different bits.
//
// C11 and CUDA C++ alike: under nvcc every function is __host__ __device__ (MOE_HD).
// Elements are `real` (float in the CUDA build, float or double in the CPU builds); sums
// and everything nonlinear run in double, the results rounded to `real` where stored.
#ifndef MOE_ROUTER_MATH_H
#define MOE_ROUTER_MATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif
#include "kernels.h"
#ifdef __cplusplus
}
#endif
#include "exp_math.h"

#ifdef __CUDACC__
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

// The per-row top-k list lives on the stack (a thread's registers on the GPU), so k has
// a fixed bound; routers use k <= 8 (Mixtral 2, OLMoE 8). Config validation uses it too.
#define MOE_TOPK_MAX 8

#define MOE_INV_SQRT_2PI 0.39894228040143267794
#define MOE_SQRT1_2 0.70710678118654752440

// ---- scalars --------------------------------------------------------------------------

// Branches on the sign so exp never sees a large positive argument.
static inline MOE_HD double stable_sigmoid(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    double e = exp(x);
    return e / (1.0 + e);
}

// log(1 + e^x) without overflow for large x nor log(1) rounding for very negative x.
static inline MOE_HD double stable_softplus(double x) {
    return log1p(exp(-fabs(x))) + fmax(x, 0.0);
}

static inline MOE_HD double normal_cdf(double z) { return 0.5 * erfc(-z * MOE_SQRT1_2); }

static inline MOE_HD double normal_pdf(double z) {
    return MOE_INV_SQRT_2PI * exp(-0.5 * z * z);
}

// Shazeer's noisy logit: clean + eps * softplus(raw).
static inline MOE_HD real noisy_value(real c, real r, real ev) {
    return (real)(c + (double)ev * stable_softplus(r));
}

// splitmix64's finaliser: the fixed hash of hash routing.
static inline MOE_HD uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// ---- scores ---------------------------------------------------------------------------

// The largest of x (E), by comparison: fmax is a libm call per element on x86. The two
// differ only where the row holds a NaN, and then the softmax and log-sum-exp below come
// out NaN either way.
static inline MOE_HD double row_max(const real *x, size_t E) {
    real mx = x[0];
    for (size_t e = 1; e < E; e++)
        mx = x[e] > mx ? x[e] : mx;
    return mx;
}

// out (E) = softmax of x (E). Max-subtracted so exp never overflows; the exps are
// normalised by their double sum, taken in expert order.
static inline MOE_HD void softmax_row(real *out, const real *x, size_t E) {
    double mx = row_max(x, E);
    MOE_EXP_SIMD
    for (size_t e = 0; e < E; e++)
        out[e] = (real)row_exp((double)x[e] - mx);
    double sum = 0.0;
    for (size_t e = 0; e < E; e++)
        sum += out[e];
    for (size_t e = 0; e < E; e++)
        out[e] = (real)(out[e] / sum);
}

// dx (E) += ds (E) through the scores s (E) of one row.
static inline MOE_HD void scores_backward_row(real *dx, const real *ds, const real *s, size_t E,
                                              int sigmoid) {
    if (sigmoid) {
        for (size_t e = 0; e < E; e++)
            dx[e] += (real)((double)ds[e] * s[e] * (1.0 - s[e]));
        return;
    }
    // Softmax Jacobian: ds/dx = diag(s) - s s^T.
    double dot = 0.0;
    for (size_t e = 0; e < E; e++)
        dot += (double)ds[e] * s[e];
    for (size_t e = 0; e < E; e++)
        dx[e] += (real)(s[e] * ((double)ds[e] - dot));
}

static inline MOE_EXP_HD double logsumexp(const real *x, size_t E) {
    double mx = row_max(x, E);
    return mx + log(row_sum_exp(x, E, mx));
}

// ---- selection ------------------------------------------------------------------------

// top (k) = the k largest of v[e] + bias[e] over a row (bias NULL: v), the sum in `real`
// as add_bias_forward takes it, among the experts whose group (of gsize consecutive
// experts) has kept[group] set (kept NULL: every expert). Insertion into a list kept
// sorted, largest first: strict > leaves an equal value behind the lower expert index
// seen earlier. k <= MOE_TOPK_MAX, and at least k experts eligible.
static inline MOE_HD void topk_row_masked(int32_t *top, const real *v, const real *bias,
                                          size_t E, size_t k, const unsigned char *kept,
                                          size_t gsize) {
    real best[MOE_TOPK_MAX];
    int32_t who[MOE_TOPK_MAX];
    size_t len = 0;
    for (size_t e = 0; e < E; e++) {
        if (kept && !kept[e / gsize]) continue;
        real x = bias ? v[e] + bias[e] : v[e];
        if (len == k && !(x > best[k - 1])) continue;
        size_t pos = len < k ? len++ : k - 1;
        for (; pos > 0 && x > best[pos - 1]; pos--) {
            best[pos] = best[pos - 1];
            who[pos] = who[pos - 1];
        }
        best[pos] = x;
        who[pos] = (int32_t)e;
    }
    for (size_t j = 0; j < k; j++)
        top[j] = who[j];
}

static inline MOE_HD void topk_row(int32_t *top, const real *v, const real *bias, size_t E,
                                   size_t k) {
    topk_row_masked(top, v, bias, E, k, NULL, 1);
}

// ---- group-limited selection (DeepSeek-V2 group_limited_greedy, V3 noaux_tc) -------------

// The most expert groups a router may have: the group mask lives on the stack like the
// top-k list (DeepSeek-V2 and V3 use 8).
#define MOE_GROUPS_MAX 64

// A group's score from its n selection values v + bias (bias NULL: v), in `real` as the
// reference computes it in fp32: the largest, or the sum of the two largest (n >= 2).
static inline MOE_HD real group_value(const real *v, const real *bias, size_t n,
                                      GroupScore how) {
    real a = bias ? v[0] + bias[0] : v[0], b = a;
    int have_b = 0;
    for (size_t e = 1; e < n; e++) {
        real x = bias ? v[e] + bias[e] : v[e];
        if (x > a) {
            b = a;
            a = x;
            have_b = 1;
        } else if (!have_b || x > b) {
            b = x;
            have_b = 1;
        }
    }
    return how == GROUP_SCORE_TOP2 ? a + b : a;
}

// top (k): the k largest of v + bias among the experts of the spec->topk_groups groups
// with the highest group_value (ties to the lower group index); plain topk_row when every
// group is kept, so ungrouped routing keeps its bits. The caller checked the spec
// (route_spec_check).
static inline MOE_HD void route_select_row(int32_t *top, const real *v, const real *bias,
                                           size_t E, size_t k, const RouteSpec *spec) {
    size_t G = spec->groups, TG = spec->topk_groups;
    if (G <= 1 || TG >= G) {
        topk_row(top, v, bias, E, k);
        return;
    }
    size_t gsize = E / G;
    real gv[MOE_GROUPS_MAX];
    unsigned char kept[MOE_GROUPS_MAX];
    for (size_t g = 0; g < G; g++)
        gv[g] = group_value(v + g * gsize, bias ? bias + g * gsize : NULL, gsize,
                            spec->group_score);
    for (size_t g = 0; g < G; g++) {
        size_t ahead = 0;   // groups ranked before g
        for (size_t h = 0; h < G; h++)
            ahead += gv[h] > gv[g] || (gv[h] == gv[g] && h < g);
        kept[g] = ahead < TG;
    }
    topk_row_masked(top, v, bias, E, k, kept, gsize);
}

// NULL when spec fits E experts and top-k, else what is wrong (the backends' checks).
static inline MOE_HD const char *route_spec_problem(const RouteSpec *spec, size_t E,
                                                     size_t k) {
    size_t G = spec->groups, TG = spec->topk_groups;
    if (G < 1 || G > MOE_GROUPS_MAX || E % G) return "groups must divide E, 1..64";
    if (TG < 1 || TG > G) return "topk_groups must be in 1..groups";
    if (TG < G && k > TG * (E / G)) return "k exceeds the experts of topk_groups groups";
    if (TG < G && spec->group_score == GROUP_SCORE_TOP2 && E / G < 2)
        return "group_score top2 needs at least 2 experts per group";
    return NULL;
}

static inline MOE_HD double selected_sum(const real *s, const int32_t *top, size_t k) {
    double sum = 0.0;
    for (size_t j = 0; j < k; j++)
        sum += s[top[j]];
    return sum;
}

// The renormalised gates' denominator: the selected scores' sum plus DeepSeek-V3's 1e-20,
// which only matters for sigmoid scores that all underflow (softmax's top-k sum is at least
// k/E, where adding 1e-20 leaves the double unchanged).
#define MOE_RENORM_EPS 1e-20

// g (k) = the scores s (E) at top (k), over their sum when renorm, times scale.
static inline MOE_HD void gates_row(real *g, const real *s, const int32_t *top, size_t k,
                                    int renorm, double scale) {
    double mult = renorm ? scale / (selected_sum(s, top, k) + MOE_RENORM_EPS) : scale;
    for (size_t j = 0; j < k; j++)
        g[j] = (real)(s[top[j]] * mult);
}

// ds (E) += dg (k) through gates_row.
static inline MOE_HD void gates_backward_row(real *ds, const real *dg, const real *s,
                                             const int32_t *top, size_t k, int renorm,
                                             double scale) {
    if (!renorm) {
        for (size_t j = 0; j < k; j++)
            ds[top[j]] += (real)(scale * dg[j]);
        return;
    }
    // g_j = c s_j / D, D = S + eps: d/ds_m = c (dg_m - sum_j dg_j s_j / D) / D.
    double sum = selected_sum(s, top, k) + MOE_RENORM_EPS, dot = 0.0;
    for (size_t j = 0; j < k; j++)
        dot += (double)dg[j] * s[top[j]];
    dot /= sum;
    for (size_t j = 0; j < k; j++)
        ds[top[j]] += (real)(scale * (dg[j] - dot) / sum);
}

// ---- row normalisation and the load-balancing loss --------------------------------------

// p (E) = s (E) / sum(s).
static inline MOE_HD void normalize_row(real *p, const real *s, size_t E) {
    double sum = 0.0;
    for (size_t e = 0; e < E; e++)
        sum += s[e];
    for (size_t e = 0; e < E; e++)
        p[e] = (real)(s[e] / sum);
}

// ds (E) += dp (E) through normalize_row.
static inline MOE_HD void normalize_row_backward(real *ds, const real *dp, const real *s,
                                                 size_t E) {
    // p_e = s_e / S: d/ds_e = (dp_e - sum_j dp_j p_j) / S.
    double sum = 0.0, dot = 0.0;
    for (size_t e = 0; e < E; e++) {
        sum += s[e];
        dot += (double)dp[e] * s[e];
    }
    dot /= sum;
    for (size_t e = 0; e < E; e++)
        ds[e] += (real)((dp[e] - dot) / sum);
}

// The load-balancing loss from G groups of n rows each, their expert counts cnt (G, E)
// and probability column sums colsum (G, E): mean_g E / (k n) * sum_i cnt_gi colsum_gi / n.
// pm (G, E) = colsum / n (NULL: not wanted).
static inline MOE_HD double lb_loss(real *pm, const int32_t *cnt, const double *colsum,
                                    size_t n, size_t E, size_t k, size_t G) {
    double sum = 0.0;
    for (size_t g = 0; g < G; g++) {
        double total = 0.0;
        for (size_t i = 0; i < E; i++)
            total += (double)cnt[g * E + i] * colsum[g * E + i];
        if (pm)
            for (size_t i = 0; i < E; i++)
                pm[g * E + i] = (real)(colsum[g * E + i] / (double)n);
        sum += (double)E / ((double)k * n) * total / (double)n;
    }
    return sum / (double)G;
}

// ---- CV^2 (Shazeer importance and load) -------------------------------------------------

typedef struct {
    double mean, var, denom; // denom = mean^2 + 1e-10, which keeps an all-zero vector finite
} Spread;

static inline MOE_HD Spread spread_of(const real *v, size_t E) {
    Spread s = {0.0, 0.0, 0.0};
    for (size_t i = 0; i < E; i++)
        s.mean += v[i];
    s.mean /= (double)E;
    for (size_t i = 0; i < E; i++)
        s.var += ((double)v[i] - s.mean) * ((double)v[i] - s.mean);
    s.var /= (double)E;
    s.denom = s.mean * s.mean + 1e-10;
    return s;
}

static inline MOE_HD double cv2(const real *v, size_t E) {
    Spread s = spread_of(v, E);
    return s.var / s.denom;
}

// grad (E) = dloss * dCV^2/dv_i. The mean's own term in dvar/dv_i vanishes since
// sum_i (v_i - mean) = 0, leaving 2/(E D) ((v_i - mean) - var mean / D).
static inline MOE_HD void cv2_grad(double *grad, const real *v, size_t E, double dloss) {
    Spread s = spread_of(v, E);
    double scale = dloss * 2.0 / ((double)E * s.denom);
    for (size_t i = 0; i < E; i++)
        grad[i] = scale * (((double)v[i] - s.mean) - s.var * s.mean / s.denom);
}

// ---- Shazeer load -----------------------------------------------------------------------

static inline MOE_HD int is_selected(const int32_t *top, size_t k, size_t i) {
    for (size_t j = 0; j < k; j++)
        if ((size_t)top[j] == i) return 1;
    return 0;
}

// The highest h (E) outside the top k (lowest index among equals): the bar a selected
// expert's clean logit must clear once its own noise is redrawn.
static inline MOE_HD size_t best_unselected(const real *h, const int32_t *top, size_t E,
                                            size_t k) {
    size_t best = E;
    for (size_t e = 0; e < E; e++)
        if (!is_selected(top, k, e) && (best == E || h[e] > h[best])) best = e;
    return best;
}

// One (token, expert) term of the load: z = (clean - thr) / std, thr = h[thr_index].
typedef struct {
    double z, std;
    size_t thr_index;
} LoadTerm;

// Row pointers clean, h, raw (E), top (k); best_out from best_unselected.
static inline MOE_HD LoadTerm load_term(const real *clean, const real *h, const real *raw,
                                        const int32_t *top, size_t k, size_t best_out,
                                        size_t i) {
    LoadTerm t;
    t.thr_index = is_selected(top, k, i) ? best_out : (size_t)top[k - 1];
    t.std = stable_softplus(raw[i]);
    t.z = ((double)clean[i] - h[t.thr_index]) / t.std;
    return t;
}

// Row n of the load loss backward: dc, dh, dr (N, E) += its terms' gradients (each NULL:
// not wanted) from clean, h, raw (N, E), top (N, k), grad (E) = dloss * dCV^2/dload and
// best_out = best_unselected of the row. Every write lands in row n.
static inline MOE_HD void load_backward_row(real *dc, real *dh, real *dr, const real *clean,
                                            const real *h, const real *raw, const int32_t *top,
                                            const double *grad, size_t n, size_t E, size_t k,
                                            size_t best_out) {
    for (size_t i = 0; i < E; i++) {
        LoadTerm t =
            load_term(clean + n * E, h + n * E, raw + n * E, top + n * k, k, best_out, i);
        double dz = grad[i] * normal_pdf(t.z); // dloss/dz for this term
        if (dc) dc[n * E + i] += (real)(dz / t.std);
        if (dh) dh[n * E + t.thr_index] -= (real)(dz / t.std);
        // dz/draw = -z/std * softplus'(raw) = -z/std * sigmoid(raw).
        if (dr) dr[n * E + i] += (real)(dz * -t.z / t.std * stable_sigmoid(raw[n * E + i]));
    }
}

#endif
