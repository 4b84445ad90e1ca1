// plan.c: `moe plan CONFIG.ini [section.key=value ...]`: the parameter count, what trains
// (finetune.train / finetune.freeze) and the memory plan the start-up of `moe train` or
// `moe finetune` would print, computed by the tape's planning pass (model_plan) with
// nothing allocated, so that a machine can be sized for a model it cannot hold.
#include "plan.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"
#include "../../model/trainable.h"
#include "../run.h"

#define MB 1e6
#define GB 1e9

// One activation set per micro-batch when pooled aux statistics keep them (train/step.h).
static int activation_sets(const RunConfig *rc) {
    int pooled = rc->train.grad_accum > 1 && rc->model.aux_scope == AUX_SCOPE_BATCH;
    return pooled && rc->train.keep_activations ? rc->train.grad_accum : 1;
}

static void print_plan(const RunConfig *rc, const Layout *lay, const uint8_t *trainable) {
    const ModelConfig *c = &rc->model;
    size_t B = (size_t)rc->train.batch_size, T = (size_t)c->seq_len;
    ModelPlan p;
    model_plan(c, backend_cpu(), B, T, trainable, &p);
    char sel[2048];
    trainable_describe(lay, trainable, sel, sizeof sel);
    int sets = activation_sets(rc);
    double opt = 2.0 * (double)p.trainable * sizeof(real);
    double total = 2.0 * (double)p.params + opt + sets * (double)p.acts + (double)p.dacts +
                   (double)p.expert_bias;
    printf("model: %d layers, d_model %d, %d experts top-%d, %.4gB params\n"
           "training: %s: %zu trainable params (%.2f%%)\n"
           "batch: %zu x %zu tokens, %d activation set%s\n",
           c->layers, c->d_model, c->experts, c->top_k, (double)lay->total / 1e9, sel,
           p.trainable, 100.0 * (double)p.trainable / (double)lay->total, B, T, sets,
           sets == 1 ? "" : "s");
    // The start-up line's figures (train.c's memory plan), then their sum.
    printf("memory plan (cpu backend, %zu-byte values, nothing allocated): parameters %.1f MB, "
           "gradients %.1f MB, optimizer state %.1f MB (trainable tensors only), activations "
           "%d x %.1f MB, their gradients %.1f MB, expert bias %.1f MB; total %.2f GB\n",
           sizeof(real), (double)p.params / MB, (double)p.params / MB, opt / MB, sets,
           (double)p.acts / MB, (double)p.dacts / MB, (double)p.expert_bias / MB, total / GB);
}

int plan_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: moe plan CONFIG.ini [section.key=value ...]\n"
                "  The memory `moe train` / `moe finetune` would allocate for the config\n"
                "  (parameters, gradients, AdamW state of what finetune.train selects,\n"
                "  activations of one train.batch_size x model.seq_len batch), computed\n"
                "  without allocating it. finetune.train = auto depends on data: name the\n"
                "  experts instead (layers.*.experts.J, ...).\n");
        return argc < 2 ? 2 : 0;
    }
    RunConfig rc;
    run_load_config(&rc, argv[1], argc - 2, argv + 2);
    if (!strcmp(rc.finetune.train, "auto"))
        FAIL("finetune.train = auto: ESFT picks experts from data; moe plan needs them named "
             "(for example finetune.train=layers.*.experts.0,layers.*.experts.1)");
    Layout lay;
    layout_init(&lay, &rc.model);
    uint8_t *trainable = CALLOC(lay.n_params, 1);
    char err[1024];
    if (trainable_select(&lay, &rc.model, rc.finetune.train, rc.finetune.freeze, trainable, err,
                         sizeof err) != 0)
        FAIL("%s", err);
    print_plan(&rc, &lay, trainable);
    free(trainable);
    layout_free(&lay);
    return 0;
}
