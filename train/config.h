// config.h: a run's whole configuration: INI file, command-line overrides, --help.
//
// Defines RunConfig (every section: [model] [router] from model/, [train] here) and
// loads it from an INI file (libinih) plus `section.key=value` override words. Every
// error is one line naming the file and line or the key, the value and what is allowed.
#ifndef MOE_TRAIN_CONFIG_H
#define MOE_TRAIN_CONFIG_H

#include <stddef.h>
#include <stdio.h>

#include "../model/config.h"

typedef struct {
    int batch_size;   // sequences per step B
    int seed;         // weights, data order and noise
} TrainConfig;

typedef struct {
    ModelConfig model;
    TrainConfig train;
} RunConfig;

#define RUN_CONFIG_SECTIONS (MODEL_CONFIG_SECTIONS + 1)
void run_config_sections(RunConfig *rc, KeySection out[RUN_CONFIG_SECTIONS]);
void run_config_defaults(RunConfig *rc);
// Reads an INI file over the current values. Returns 0 or -1 with err set.
int run_config_load_ini(RunConfig *rc, const char *path, char *err, size_t err_len);
// Applies one "section.key=value" word. Returns 0 or -1 with err set.
int run_config_override(RunConfig *rc, const char *word, char *err, size_t err_len);
int run_config_validate(const RunConfig *rc, char *err, size_t err_len);
void run_config_write_ini(FILE *f, RunConfig *rc);
void run_config_print_help(FILE *f);

#endif
