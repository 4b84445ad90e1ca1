// plan.c: what model_init would allocate, measured without allocating it (model_plan).
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "build.h"
#include "model.h"

void model_plan(const ModelConfig *cfg, const Backend *be, size_t B, size_t T,
                const uint8_t *trainable, ModelPlan *out) {
    char err[512];
    CHECK(model_config_validate(cfg, err, sizeof err) == 0, "%s", err);
    Model m;
    memset(&m, 0, sizeof m);
    m.cfg = *cfg;
    m.be = be;
    m.B = B;
    m.T = T;
    m.N = B * T;
    layout_init(&m.layout, cfg);
    // Views into NULL slabs: the measuring pass only counts (tensor_slice allows it).
    m.params = (Tensor){NULL, DTYPE_REAL, be->device, m.layout.total};
    m.grads = m.params;
    m.n_moe = model_config_moe_layers(cfg);
    m.expert_bias =
        (Tensor){NULL, DTYPE_REAL, be->device, (size_t)m.n_moe * (size_t)cfg->experts};
    if (trainable) {
        m.trainable = CALLOC(m.layout.n_params, 1);
        memcpy(m.trainable, trainable, m.layout.n_params);
    }
    m.moe = CALLOC((size_t)m.n_moe, sizeof *m.moe);
    m.expert_train = CALLOC((size_t)m.n_moe * (size_t)cfg->experts, 1);
    m.block_op = CALLOC((size_t)cfg->layers, sizeof *m.block_op);
    tape_init(&m.tape);
    m.acts.device = m.dacts.device = be->device;
    build_tape(&m); // the measuring pass of plan_tape: arenas with a NULL base
    out->params = m.layout.total * sizeof(real);
    out->acts = m.acts.used;
    out->dacts = m.dacts.used;
    out->trainable = 0;
    for (size_t i = 0; i < m.layout.n_params; i++)
        if (!trainable || trainable[i]) out->trainable += m.layout.params[i].numel;
    out->expert_bias = m.expert_bias.numel * sizeof(real);
    tape_free(&m.tape);
    free(m.moe);
    free(m.expert_train);
    free(m.block_op);
    free(m.trainable);
    layout_free(&m.layout);
}
