// config.h: the data configuration ([data] and one [domain <name>] section per domain).
//
// A domain is one named token stream (fortunes, bible, python, ...) with a train and a
// val source and a sampling weight. Sources are a file, a directory (every regular file
// below it, sorted by path) or a glob pattern, read as one of four kinds: raw text,
// llm.c token shards, HDF5 token datasets or a CSV text column. With no [domain ...]
// section the three domains of the default corpus (data/prepare.h) are used.
#ifndef MOE_DATA_CONFIG_H
#define MOE_DATA_CONFIG_H

#include <stddef.h>
#include <stdio.h>

#include "../base/keys.h"

#define DATA_MAX_DOMAINS 16
#define DATA_NAME_MAX 64

typedef enum { DATA_TEXT = 0, DATA_SHARDS = 1, DATA_HDF5 = 2, DATA_CSV = 3 } DataKind;
typedef enum { DATA_SPLIT_TRAIN = 0, DATA_SPLIT_VAL = 1 } DataSplit;

typedef struct {
    char name[DATA_NAME_MAX];
    char section[DATA_NAME_MAX + 8];   // "domain <name>", the INI section this came from
    int kind;                          // DataKind
    char train[KEY_STRING_MAX];        // file, directory or glob
    char val[KEY_STRING_MAX];
    double weight;                     // sampling probability is weight / sum of weights
    // KEY_STRING values are copied up to KEY_STRING_MAX bytes, so these are that size too.
    char dataset[KEY_STRING_MAX];      // DATA_HDF5: dataset path inside each file
    char column[KEY_STRING_MAX];       // DATA_CSV: header name of the text column
    char text[KEY_STRING_MAX];         // shorthand: kind text, train = this, val held out
} DomainConfig;

typedef struct {
    DomainConfig domains[DATA_MAX_DOMAINS];
    int n_domains;
    int val_tokens;                    // at most this many val tokens per domain
    char default_dir[KEY_STRING_MAX];  // default corpus, used when no domain is given
    double val_fraction;               // held out of train when a domain has no val
    int tokenizer;                     // TokenizerKind (tokenizer.h)
    char tokenizer_file[KEY_STRING_MAX];    // tokenizer.json or .model; none for bytes
    char tokenizer_crc32[KEY_STRING_MAX];   // the run's copy of it (8 hex digits), set by runs
    int eos_id;                        // end-of-sequence id generation stops at; -1: none
} DataConfig;

// Defaults of [data]; no domains.
void data_config_defaults(DataConfig *cfg);
// The [data] section bound to cfg.
KeySection data_config_section(DataConfig *cfg);
// Appends a domain with default keys. Returns it, or NULL with err set when the name is
// invalid or taken, or DATA_MAX_DOMAINS are already configured.
DomainConfig *data_config_add_domain(DataConfig *cfg, const char *name, char *err, size_t n);
// The domain called name, or NULL.
DomainConfig *data_config_find_domain(DataConfig *cfg, const char *name);
// The [domain <name>] section bound to d.
KeySection data_domain_section(DomainConfig *d);
// With no domain configured, adds fortunes, bible and python reading
// <default_dir>/<name>/{train,val}.txt as text.
void data_config_use_default(DataConfig *cfg);
// Checks what single keys cannot: every domain names its train source (train or text,
// not both), and a tokenizer other than bytes names its file.
int data_config_validate(const DataConfig *cfg, char *err, size_t n);
// [data] then every [domain <name>] section, as INI.
void data_config_write_ini(FILE *f, DataConfig *cfg);

#endif
