#include "commands.h"

#include <libgen.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../base/util.h"
#include "../../model/esft.h"
#include "../formats/checkpoint.h"
#include "../eval.h"
#include "../logits.h"
#include "../report.h"
#include "../run.h"

// Words after the positional arguments: "section.key=value" overrides only.
static int is_override(const char *w) { return strchr(w, '=') && strchr(w, '.'); }

// `moe eval CKPT [DATA] [overrides] [--dump-logits FILE]`: per-domain validation loss and
// perplexity, on the checkpoint's own domains or on DATA (a text file, directory or glob).
int eval_main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help")) {
        printf("usage: moe eval CHECKPOINT [DATA] [section.key=value ...] [--dump-logits FILE]\n"
               "  Validation loss (nats per token) and perplexity per domain: the domains\n"
               "  stored in the checkpoint's config, or DATA (text file, directory, glob).\n"
               "  --dump-logits FILE (the last two words): also write the first domain's\n"
               "  first validation batch, its tokens and logits, to FILE (HDF5).\n");
        return argc < 2 ? 2 : 0;
    }
    char ckpt[KEY_STRING_MAX];
    run_resolve_checkpoint(argv[1], ckpt, sizeof ckpt);
    const char *dump = NULL;
    if (argc > 3 && !strcmp(argv[argc - 2], "--dump-logits")) {
        dump = argv[argc - 1];
        argc -= 2;
    }
    int data_arg = argc > 2 && !is_override(argv[2]);
    RunConfig rc;
    run_load_checkpoint_config(&rc, ckpt, argc - 2 - data_arg, argv + 2 + data_arg);
    if (data_arg) run_use_text_domain(&rc, "data", argv[2]);
    Model m;
    run_model_from_checkpoint(&m, &rc, ckpt, (size_t)rc.train.batch_size);
    DataLoader *dl = run_open_data(&rc, &m, (uint64_t)rc.train.seed);
    if (dump) logits_dump(dump, &m, dl);
    EvalResult ev;
    eval_result_init(&ev, &rc.model, data_loader_domains(dl));
    eval_run(&ev, &m, dl);
    printf("%-16s %10s %12s\n", "domain", "loss", "perplexity");
    for (int d = 0; d < ev.n_domains; d++)
        printf("%-16s %10.4f %12.3f\n", data_loader_domain_name(dl, d), ev.loss[d],
               exp(ev.loss[d]));
    printf("%-16s %10.4f %12.3f\n", "mean", ev.loss[ev.n_domains], exp(ev.loss[ev.n_domains]));
    eval_result_free(&ev);
    data_loader_close(dl);
    model_free(&m);
    return 0;
}

static void write_esft_csv(const char *path, const EsftResult *es, const Model *m) {
    FILE *f = fopen(path, "w");
    if (!f) FAIL("%s: cannot write", path);
    fprintf(f, "layer,expert,token_score,gate_score,selected\n");
    for (int l = 0; l < es->n_layers; l++)
        for (int e = 0; e < es->experts; e++) {
            size_t c = (size_t)l * es->experts + e;
            fprintf(f, "%d,%d,%.6f,%.6f,%d\n", m->moe[l].layer, e, es->token[c], es->gate[c],
                    es->selected[c]);
        }
    fclose(f);
}

// `moe experts CKPT DATA [finetune.select=token|gate] [finetune.p=0.2] [--csv FILE]`
int experts_main(int argc, char **argv) {
    if (argc < 3 || !strcmp(argv[1], "--help")) {
        printf("usage: moe experts CHECKPOINT DATA [finetune.select=token|gate] "
               "[finetune.p=0.2] [finetune.select_batches=16] [--csv FILE]\n"
               "  ESFT (Wang et al. 2024): per MoE layer, the token selection ratio and mean\n"
               "  gate of each expert on DATA (text file, directory or glob), normalised within\n"
               "  the layer; prints the fewest experts per layer whose score reaches p and\n"
               "  writes every score to FILE (default: esft.csv beside the checkpoint).\n");
        return argc < 3 ? 2 : 0;
    }
    char ckpt[KEY_STRING_MAX];
    run_resolve_checkpoint(argv[1], ckpt, sizeof ckpt);
    // Beside the checkpoint, as moe route's output, so that nothing lands in the working
    // directory unasked.
    char dir[KEY_STRING_MAX], beside[RUN_FILE_MAX];
    snprintf(dir, sizeof dir, "%s", ckpt);
    snprintf(beside, sizeof beside, "%s/esft.csv", dirname(dir));
    const char *csv = beside;
    char *words[64];
    int n_words = 0;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
        else if (n_words < 64) words[n_words++] = argv[i];
    }
    RunConfig rc;
    run_load_checkpoint_config(&rc, ckpt, n_words, words);
    run_use_text_domain(&rc, "data", argv[2]);
    Model m;
    run_model_from_checkpoint(&m, &rc, ckpt, (size_t)rc.train.batch_size);
    DataLoader *dl = run_open_data(&rc, &m, (uint64_t)rc.train.seed ^ 0x65736674ULL);
    RoutingStats rs;
    routing_stats_init(&rs, &rc.model);
    run_collect_routing(&m, dl, rc.finetune.select_batches, &rs);
    EsftResult es;
    esft_select(&es, &rs, (EsftScore)rc.finetune.select, rc.finetune.p);
    printf("ESFT on %s (%llu tokens), %s score, p = %.3g\n", argv[2],
           (unsigned long long)rs.tokens, rc.finetune.select == ESFT_GATE ? "gate" : "token",
           rc.finetune.p);
    for (int l = 0; l < es.n_layers; l++) {
        printf("layer %d:", m.moe[l].layer);
        for (int e = 0; e < es.experts; e++)
            if (es.selected[(size_t)l * es.experts + e])
                printf(" e%d (%.3f)", e, es.score[(size_t)l * es.experts + e]);
        printf("\n");
    }
    char expr[4096];
    esft_to_expr(&es, &rc.model, expr, sizeof expr);
    printf("finetune.train = %s\n", expr);
    write_esft_csv(csv, &es, &m);
    printf("scores written to %s\n", csv);
    esft_free(&es);
    routing_stats_free(&rs);
    data_loader_close(dl);
    model_free(&m);
    return 0;
}

// `moe merge BASE DELTA OUT`: the full model a delta fine-tune produced.
int merge_main(int argc, char **argv) {
    if (argc != 4) {
        printf("usage: moe merge BASE DELTA OUT\n"
               "  Applies a delta checkpoint (finetune.delta = true) to the base it was\n"
               "  trained from and writes the full model to OUT. BASE and DELTA may be run\n"
               "  directories (their latest checkpoints).\n");
        return argc == 2 && !strcmp(argv[1], "--help") ? 0 : 2;
    }
    char err[1024], base[KEY_STRING_MAX], delta[KEY_STRING_MAX];
    run_resolve_checkpoint(argv[1], base, sizeof base);
    run_resolve_checkpoint(argv[2], delta, sizeof delta);
    RunConfig rc;
    run_load_checkpoint_config(&rc, base, 0, NULL);
    Model m;
    run_model_from_checkpoint(&m, &rc, base, 1);
    uint64_t expected, actual = ckpt_fingerprint(&m);
    if (ckpt_read_base_fingerprint(delta, &expected, err, sizeof err) != 0) FAIL("%s", err);
    if (expected == 0) FAIL("%s is not a delta checkpoint (finetune.delta = true)", delta);
    if (expected != actual)
        FAIL("%s was not trained from %s (base fingerprint %016llx, this base %016llx)", delta,
             base, (unsigned long long)expected, (unsigned long long)actual);
    if (ckpt_load(delta, &m, NULL, NULL, err, sizeof err) != 0) FAIL("%s", err);
    RunConfig delta_rc;
    run_load_checkpoint_config(&delta_rc, delta, 0, NULL);
    delta_rc.finetune.delta = 0;
    TrainState st = {0};
    st.best_val = INFINITY;
    if (ckpt_save(argv[3], &delta_rc, &m, NULL, &st, NULL, 0, err, sizeof err) != 0)
        FAIL("%s", err);
    printf("merged %s onto %s -> %s\n", delta, base, argv[3]);
    model_free(&m);
    return 0;
}

// `moe report RUN_DIR`: report.html from the run's files, as the end of a run writes it.
int report_main(int argc, char **argv) {
    if (argc != 2 || !strcmp(argv[1], "--help")) {
        printf("usage: moe report RUN_DIR\n"
               "  Writes RUN_DIR/report.html (figures beside it, through gnuplot) from the\n"
               "  run's metrics.csv, experts.csv, startup.txt and config.ini.\n");
        return argc == 2 ? 0 : 2;
    }
    char msg[3 * RUN_FILE_MAX];
    if (report_write_run(argv[1], msg, sizeof msg) != 0) FAIL("%s", msg);
    printf("%s\n", msg);
    return 0;
}
