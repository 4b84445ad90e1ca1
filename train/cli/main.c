// main.c: the `moe` command line.
#include <stdio.h>
#include <string.h>

#include "../../data/prepare.h"
#include "../../dist/dist.h"
#include "../../kernels/cpu/blas.h"
#include "../config.h"
#include "../train.h"
#include "ablate.h"
#include "commands.h"
#include "dump.h"
#include "hf_commands.h"
#include "plan.h"
#include "route.h"
#include "tokenize.h"

static void print_usage(FILE *f) {
    fprintf(f,
            "moe: train and fine-tune sparse Mixture-of-Experts language models\n"
            "\n"
            "usage: moe <command> [args]\n"
            "commands:\n"
            "  train CONFIG.ini [section.key=value ...]  train a model (--help: every key)\n"
            "  train --resume RUN_DIR|CHECKPOINT     continue a run bit for bit\n"
            "  finetune CONFIG.ini finetune.init=CKPT  train selected tensors of a model\n"
            "  experts CHECKPOINT DATA               which experts serve DATA (ESFT)\n"
            "  merge BASE DELTA OUT                  apply a delta fine-tune to its base\n"
            "  report RUN_DIR                        the run's report.html (figures, numbers)\n"
            "  eval CHECKPOINT [DATA]                loss and perplexity per domain\n"
            "                [--dump-logits FILE]    (and one batch's logits to HDF5)\n"
            "  sample CHECKPOINT [--prompt TEXT]...  generate text through a KV cache\n"
            "        [--top-k K] [--stop TEXT] ...   (moe sample --help lists the options)\n"
            "  ablate GRID.ini [--jobs N] [--out DIR]  train router variants side by side\n"
            "  route CHECKPOINT [DATA ...] [--out DIR] [--compare CKPT] [--tokens N]\n"
            "        [--esft CSV]                    expert activation maps, co-activation,\n"
            "                                        router saturation, route.html\n"
            "  export CHECKPOINT DIR [--dtype f32|bf16] [--shard-size BYTES] [--force]\n"
            "                                        a Hugging Face Mixtral directory\n"
            "                                        (config.json, safetensors)\n"
            "  import HF_DIR OUT.h5 [--seq-len N]    a Hugging Face Mixtral directory as a\n"
            "                                        checkpoint (for finetune)\n"
            "  tokenize TOKENIZER INPUT... --out FILE text files to llm.c shards (.bin) or\n"
            "                                        HDF5 tokens (.h5)\n"
            "  tokenizer train INPUT... --vocab-size N --out PREFIX\n"
            "                                        a SentencePiece BPE tokenizer\n"
            "  prepare [DIR]                         build the default three-domain corpus\n"
            "                                        (default data/default)\n"
            "  dump OUT.h5 [section.key=value ...]   forward/backward on test weights, all\n"
            "                                        tensors to HDF5 (reference tests)\n"
            "  plan CONFIG.ini [section.key=value ...]  the memory a run would allocate,\n"
            "                                        computed without allocating it\n"
            "  help                                  this text and every config key\n"
            "\n"
            "config keys (INI sections [model] [router] [train] [optim] [data] and one\n"
            "[domain NAME] per data domain; override on the command line as\n"
            "section.key=value, or domain.NAME.key=value):\n");
    run_config_print_help(f);
}

static int prepare_main(int argc, char **argv) {
    if (argc > 1 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        printf("usage: moe prepare [DIR]\n  Builds fortunes, bible and python domains "
               "(train/val text and MANIFEST.tsv) into DIR (default data/default), "
               "installing the Debian packages they come from when missing.\n");
        return 0;
    }
    char err[1024];
    const char *dir = argc > 1 ? argv[1] : "data/default";
    if (data_prepare_default(dir, err, sizeof err) != 0) {
        fprintf(stderr, "moe: error: %s\n", err);
        return 1;
    }
    return 0;
}

static int run_command(int argc, char **argv) {
    if (argc < 2) {
        print_usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        print_usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "train")) return train_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "finetune")) return finetune_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "experts")) return experts_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "merge")) return merge_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "report")) return report_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return eval_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "sample")) return sample_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "ablate")) return ablate_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "route")) return route_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "export")) return export_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "import")) return import_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "prepare")) return prepare_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return tokenize_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenizer")) return tokenizer_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "dump")) return dump_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "plan")) return plan_main(argc - 1, argv + 1);
    fprintf(stderr, "moe: error: unknown command '%s'\nHINT: moe help lists the commands\n", cmd);
    return 2;
}

// The kernel choice may re-execute the process, so MPI starts after it.
int main(int argc, char **argv) {
    cpu_blas_select_kernel(argv);
    dist_init(&argc, &argv);
    int rc = run_command(argc, argv);
    dist_finalize();
    return rc;
}
