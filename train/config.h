// config.h: a run's whole configuration: INI file, command-line overrides, --help.
//
// Defines TrainConfig ([train]) and RunConfig, which gathers every room's section:
// [model] [router] (model/), [optim] (optim/), [data] and one [domain NAME] per data
// domain (data/). Loaded from an INI file (libinih) plus `section.key=value` override
// words (`domain.NAME.key=value` for domains). Every error is one line naming the file
// and line or the key, the value and what is allowed.
#ifndef MOE_TRAIN_CONFIG_H
#define MOE_TRAIN_CONFIG_H

#include <stddef.h>
#include <stdio.h>

#include "../data/config.h"
#include "../dist/config.h"
#include "../model/config.h"
#include "../optim/config.h"

typedef enum { TRAIN_DEVICE_CPU = 0, TRAIN_DEVICE_CUDA = 1 } TrainDevice;
// auto: bf16 products on cuda, fp32 on cpu.
typedef enum { PRECISION_AUTO = 0, PRECISION_FP32 = 1, PRECISION_BF16 = 2 } TrainPrecision;
typedef enum { EXPERT_GEMM_LOOP = 0, EXPERT_GEMM_GROUPED = 1 } TrainExpertGemm;
// What a step with a non-finite loss or gradient does.
typedef enum { NONFINITE_ABORT = 0, NONFINITE_SKIP = 1, NONFINITE_ROLLBACK = 2 } TrainNonfinite;

typedef struct {
    int batch_size;      // sequences per micro-batch B
    int grad_accum;      // micro-batches per optimizer step
    int steps;           // optimizer steps
    int eval_every;      // steps between validation passes (0: only at the end)
    int log_every;       // steps between plain log lines (not on a terminal)
    int threads;         // OpenMP threads (0: all cores)
    int device;          // TrainDevice
    int precision;       // TrainPrecision
    int expert_gemm;     // TrainExpertGemm
    int keep_activations;   // pooled aux statistics: one activation set per micro-batch
    int seed;            // weights, data order and router noise
    char name[KEY_STRING_MAX];      // run name (default: the config file's base name)
    char out_dir[KEY_STRING_MAX];   // runs go to <out_dir>/<name>/
    int ckpt_every;      // steps between checkpoints (0: only at the end)
    int keep;            // step checkpoints kept (the best one is kept besides)
    int sample_tokens;   // bytes sampled at the end (0: none)
    double sample_temperature;
    char sample_prompt[KEY_STRING_MAX];
    int on_nonfinite;           // TrainNonfinite
    double rollback_lr_factor;  // rollback: the learning rate is multiplied by this
    int max_rollbacks;          // rollbacks to one checkpoint before the run gives up
} TrainConfig;

// [finetune]: what trains, starting from which checkpoint.
typedef struct {
    char init[KEY_STRING_MAX];    // checkpoint to start from (moe finetune)
    char train[KEY_STRING_MAX];   // selector list (model/trainable.h) or "auto" (ESFT)
    char freeze[KEY_STRING_MAX];  // selector list subtracted from train
    int delta;                    // checkpoints hold only the trained tensors
    int select;                   // EsftScore for train = auto
    double p;                     // ESFT cumulative score threshold
    int select_batches;           // training batches routed to score experts
} FinetuneConfig;

typedef struct {
    ModelConfig model;
    TrainConfig train;
    OptimConfig optim;
    DataConfig data;
    FinetuneConfig finetune;
    DistConfig dist;
} RunConfig;

// Fixed sections: model, router, train, optim, finetune, data, dist (domains come after).
#define RUN_CONFIG_FIXED (MODEL_CONFIG_SECTIONS + 5)
#define RUN_CONFIG_MAX_SECTIONS (RUN_CONFIG_FIXED + DATA_MAX_DOMAINS)
// A run directory (<out_dir>/<name>) plus a file name in it.
#define RUN_PATH_MAX (2 * KEY_STRING_MAX + 64)
#define RUN_FILE_MAX (RUN_PATH_MAX + 64)
// Every section bound to rc; returns how many.
int run_config_sections(RunConfig *rc, KeySection out[RUN_CONFIG_MAX_SECTIONS]);
void run_config_defaults(RunConfig *rc);
// Reads an INI file over the current values. Returns 0 or -1 with err set.
int run_config_load_ini(RunConfig *rc, const char *path, char *err, size_t err_len);
// Applies one "section.key=value" word. Returns 0 or -1 with err set.
int run_config_override(RunConfig *rc, const char *word, char *err, size_t err_len);
int run_config_validate(const RunConfig *rc, char *err, size_t err_len);
void run_config_write_ini(FILE *f, RunConfig *rc);
void run_config_print_help(FILE *f);

#endif
