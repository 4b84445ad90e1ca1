#include "routing_stats.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"

void routing_stats_init(RoutingStats *rs, const ModelConfig *cfg) {
    memset(rs, 0, sizeof *rs);
    rs->n_layers = model_config_moe_layers(cfg);
    rs->experts = cfg->experts;
    rs->top_k = cfg->top_k;
    size_t n = (size_t)rs->n_layers * (size_t)rs->experts;
    rs->routed = CALLOC(n, sizeof *rs->routed);
    rs->dropped = CALLOC(n, sizeof *rs->dropped);
    rs->gate_sum = CALLOC(n, sizeof *rs->gate_sum);
    rs->entropy_sum = CALLOC((size_t)rs->n_layers, sizeof *rs->entropy_sum);
    rs->lse_sum = CALLOC((size_t)rs->n_layers, sizeof *rs->lse_sum);
}

void routing_stats_free(RoutingStats *rs) {
    free(rs->routed);
    free(rs->dropped);
    free(rs->gate_sum);
    free(rs->entropy_sum);
    free(rs->lse_sum);
    memset(rs, 0, sizeof *rs);
}

void routing_stats_reset(RoutingStats *rs) {
    size_t n = (size_t)rs->n_layers * (size_t)rs->experts;
    rs->tokens = 0;
    memset(rs->routed, 0, n * sizeof *rs->routed);
    memset(rs->dropped, 0, n * sizeof *rs->dropped);
    memset(rs->gate_sum, 0, n * sizeof *rs->gate_sum);
    memset(rs->entropy_sum, 0, (size_t)rs->n_layers * sizeof *rs->entropy_sum);
    memset(rs->lse_sum, 0, (size_t)rs->n_layers * sizeof *rs->lse_sum);
}

// Entropy of each token's scores made a distribution, and logsumexp of its logits.
static void add_router_health(RoutingStats *rs, int l, const Model *m, const MoeLayerState *st,
                              size_t tokens) {
    size_t E = (size_t)rs->experts;
    if (st->probs.data) {
        real *p = CALLOC(tokens * E, sizeof *p);
        m->be->download(p, st->probs, tokens * E * sizeof *p);
        for (size_t n = 0; n < tokens; n++) {
            double sum = 0.0, h = 0.0;
            for (size_t e = 0; e < E; e++) sum += p[n * E + e];
            for (size_t e = 0; e < E; e++) {
                double q = p[n * E + e] / sum;
                if (q > 0) h -= q * log(q);
            }
            rs->entropy_sum[l] += h;
        }
        free(p);
    }
    if (st->lse.data) {
        real *lse = CALLOC(tokens, sizeof *lse);
        m->be->download(lse, st->lse, tokens * sizeof *lse);
        for (size_t n = 0; n < tokens; n++) rs->lse_sum[l] += lse[n];
        free(lse);
    }
}

// Expert choice offers every (token, expert) slot; only the experts' picks are routed.
void routing_stats_add(RoutingStats *rs, const Model *m, size_t rows) {
    size_t slots = model_config_slots(&m->cfg), n = rows * m->T * slots, E = (size_t)rs->experts;
    int choice = m->cfg.select == SELECT_EXPERT_CHOICE;
    int32_t *idx = CALLOC(n, sizeof *idx), *keep = CALLOC(n, sizeof *keep);
    real *gates = CALLOC(n, sizeof *gates);
    for (int l = 0; l < rs->n_layers; l++) {
        const MoeLayerState *st = &m->moe[l];
        m->be->download(idx, st->idx, n * sizeof *idx);
        m->be->download(keep, st->keep, n * sizeof *keep);
        m->be->download(gates, st->gates, n * sizeof *gates);
        for (size_t a = 0; a < n; a++) {
            if (choice && !keep[a]) continue;
            size_t cell = (size_t)l * E + (size_t)idx[a];
            rs->routed[cell]++;
            rs->dropped[cell] += keep[a] == 0;
            rs->gate_sum[cell] += (double)gates[a];
        }
        add_router_health(rs, l, m, st, rows * m->T);
    }
    rs->tokens += rows * m->T;
    free(idx);
    free(keep);
    free(gates);
}

void routing_stats_merge(RoutingStats *dst, const RoutingStats *src) {
    size_t n = (size_t)src->n_layers * (size_t)src->experts;
    for (size_t i = 0; i < n; i++) {
        dst->routed[i] += src->routed[i];
        dst->dropped[i] += src->dropped[i];
        dst->gate_sum[i] += src->gate_sum[i];
    }
    for (int l = 0; l < src->n_layers; l++) {
        dst->entropy_sum[l] += src->entropy_sum[l];
        dst->lse_sum[l] += src->lse_sum[l];
    }
    dst->tokens += src->tokens;
}

double routing_layer_dropped(const RoutingStats *rs, int l) {
    uint64_t routed = 0, dropped = 0;
    for (int e = 0; e < rs->experts; e++) {
        routed += rs->routed[(size_t)l * rs->experts + e];
        dropped += rs->dropped[(size_t)l * rs->experts + e];
    }
    return routed ? (double)dropped / (double)routed : 0.0;
}

double routing_layer_maxvio(const RoutingStats *rs, int l) {
    const uint64_t *load = rs->routed + (size_t)l * (size_t)rs->experts;
    uint64_t max = 0, sum = 0;
    for (int e = 0; e < rs->experts; e++) {
        sum += load[e];
        if (load[e] > max) max = load[e];
    }
    double mean = (double)sum / rs->experts;
    return mean > 0 ? ((double)max - mean) / mean : 0.0;
}

double routing_layer_entropy(const RoutingStats *rs, int l) {
    return rs->tokens ? rs->entropy_sum[l] / (double)rs->tokens : 0.0;
}

double routing_layer_lse(const RoutingStats *rs, int l) {
    return rs->tokens ? rs->lse_sum[l] / (double)rs->tokens : 0.0;
}

int routing_layer_dead(const RoutingStats *rs, int l) {
    int dead = 0;
    for (int e = 0; e < rs->experts; e++) dead += rs->routed[(size_t)l * rs->experts + e] == 0;
    return dead;
}

static double layer_mean(const RoutingStats *rs, double (*f)(const RoutingStats *, int)) {
    double sum = 0.0;
    for (int l = 0; l < rs->n_layers; l++) sum += f(rs, l);
    return rs->n_layers ? sum / rs->n_layers : 0.0;
}

double routing_dropped_fraction(const RoutingStats *rs) {
    uint64_t routed = 0, dropped = 0;
    size_t n = (size_t)rs->n_layers * (size_t)rs->experts;
    for (size_t i = 0; i < n; i++) {
        routed += rs->routed[i];
        dropped += rs->dropped[i];
    }
    return routed ? (double)dropped / (double)routed : 0.0;
}

double routing_maxvio(const RoutingStats *rs) {
    return rs->tokens ? layer_mean(rs, routing_layer_maxvio) : 0.0;
}

double routing_entropy(const RoutingStats *rs) { return layer_mean(rs, routing_layer_entropy); }

double routing_lse(const RoutingStats *rs) { return layer_mean(rs, routing_layer_lse); }

int routing_dead(const RoutingStats *rs) {
    int dead = 0;
    for (int l = 0; l < rs->n_layers; l++) dead += routing_layer_dead(rs, l);
    return dead;
}

static int router_trains(const Model *m, int layer) {
    if (!m->trainable) return 1;
    char name[96];
    snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.weight", layer);
    const ParamInfo *p = layout_find(&m->layout, name);
    return p && m->trainable[p - m->layout.params];
}

void routing_update_expert_bias(Model *m, const RoutingStats *rs, double gamma) {
    size_t E = (size_t)rs->experts;
    real *b = CALLOC(E, sizeof *b);
    for (int l = 0; l < rs->n_layers; l++) {
        if (!router_trains(m, m->moe[l].layer)) continue;
        const uint64_t *load = rs->routed + (size_t)l * E;
        double mean = 0.0;
        for (size_t e = 0; e < E; e++) mean += (double)load[e] / (double)E;
        m->be->download(b, m->moe[l].bias, E * sizeof *b);
        for (size_t e = 0; e < E; e++) {
            double d = mean - (double)load[e];
            b[e] += (real)(gamma * (double)((d > 0) - (d < 0)));
        }
        m->be->upload(m->moe[l].bias, b, E * sizeof *b);
    }
    free(b);
}
