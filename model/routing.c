#include "routing.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../kernels/util.h"

void routing_stats_init(RoutingStats *rs, const ModelConfig *cfg) {
    memset(rs, 0, sizeof *rs);
    rs->n_layers = model_config_moe_layers(cfg);
    rs->experts = cfg->experts;
    rs->top_k = cfg->top_k;
    size_t n = (size_t)rs->n_layers * (size_t)rs->experts;
    rs->routed = CALLOC(n, sizeof *rs->routed);
    rs->dropped = CALLOC(n, sizeof *rs->dropped);
    rs->gate_sum = CALLOC(n, sizeof *rs->gate_sum);
}

void routing_stats_free(RoutingStats *rs) {
    free(rs->routed);
    free(rs->dropped);
    free(rs->gate_sum);
    memset(rs, 0, sizeof *rs);
}

void routing_stats_reset(RoutingStats *rs) {
    size_t n = (size_t)rs->n_layers * (size_t)rs->experts;
    rs->tokens = 0;
    memset(rs->routed, 0, n * sizeof *rs->routed);
    memset(rs->dropped, 0, n * sizeof *rs->dropped);
    memset(rs->gate_sum, 0, n * sizeof *rs->gate_sum);
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
    }
    rs->tokens += rows * m->T;
    free(idx);
    free(keep);
    free(gates);
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
    if (rs->n_layers == 0 || rs->tokens == 0) return 0.0;
    double total = 0.0;
    for (int l = 0; l < rs->n_layers; l++) {
        const uint64_t *load = rs->routed + (size_t)l * (size_t)rs->experts;
        uint64_t max = 0, sum = 0;
        for (int e = 0; e < rs->experts; e++) {
            sum += load[e];
            if (load[e] > max) max = load[e];
        }
        double mean = (double)sum / rs->experts;
        total += mean > 0 ? ((double)max - mean) / mean : 0.0;
    }
    return total / rs->n_layers;
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
