#include "config.h"

#include <string.h>

#include "../base/util.h"
#include "tokenizer.h"

#define DK(field) offsetof(DataConfig, field)
#define DOM(field) offsetof(DomainConfig, field)

static const ConfigKey data_keys[] = {
    {"val_tokens", KEY_INT, DK(val_tokens), "65536", 1, 2147483647, NULL,
     "validation tokens per domain (at most; windows from the start of val)"},
    {"default_dir", KEY_STRING, DK(default_dir), "data/default", 0, 0, NULL,
     "default corpus (make data), used when no [domain ...] section is given"},
    {"val_fraction", KEY_DOUBLE, DK(val_fraction), "0.1", 0.001, 0.5, NULL,
     "a domain with no val source: this last fraction of its train tokens is held out "
     "for validation"},
    {"tokenizer", KEY_ENUM, DK(tokenizer), "bytes", 0, 0, TOKENIZER_KIND_NAMES,
     "text and CSV sources: bytes (ids 0-255), hf-bpe (a Hugging Face tokenizer.json) or "
     "sentencepiece (a .model); copied into the run directory"},
    {"tokenizer_file", KEY_STRING, DK(tokenizer_file), "", 0, 0, NULL,
     "the tokenizer.json or .model file (runs, checkpoints: the copy beside them)"},
    {"tokenizer_crc32", KEY_STRING, DK(tokenizer_crc32), "", 0, 0, NULL,
     "set by runs: the CRC-32 of the tokenizer file; a copy that differs is refused"},
    {"eos_id", KEY_INT, DK(eos_id), "-1", -1, 2147483647, NULL,
     "end-of-sequence token id: moe sample ends a sequence there (-1: none); moe import "
     "sets it from config.json's eos_token_id"},
};

static const ConfigKey domain_keys[] = {
    {"kind", KEY_ENUM, DOM(kind), "text", 0, 0, "text|shards|hdf5|csv",
     "source format: raw bytes, llm.c uint16 shards, HDF5 token dataset, CSV column"},
    {"train", KEY_STRING, DOM(train), "", 0, 0, NULL,
     "training source: a file, a directory (all files, sorted) or a glob"},
    {"val", KEY_STRING, DOM(val), "", 0, 0, NULL,
     "validation source, as train (empty: the last data.val_fraction of train)"},
    {"text", KEY_STRING, DOM(text), "", 0, 0, NULL,
     "shorthand for kind = text, train = this file (directory, glob), no val: the last "
     "data.val_fraction is held out"},
    {"weight", KEY_DOUBLE, DOM(weight), "1", 0, 1e6, NULL,
     "sampling weight: rows come from this domain with probability weight / sum "
     "(0: validation only)"},
    {"dataset", KEY_STRING, DOM(dataset), "tokens", 0, 0, NULL,
     "kind = hdf5: name of the 1-D integer dataset in each file"},
    {"column", KEY_STRING, DOM(column), "text", 0, 0, NULL,
     "kind = csv: header name of the text column"},
};

static const char *const default_domains[] = {"fortunes", "bible", "python"};

void data_config_defaults(DataConfig *cfg) {
    memset(cfg, 0, sizeof *cfg);
    KeySection s = data_config_section(cfg);
    keys_set_defaults(&s);
}

KeySection data_config_section(DataConfig *cfg) {
    return (KeySection){"data", data_keys, sizeof data_keys / sizeof *data_keys, cfg};
}

KeySection data_domain_section(DomainConfig *d) {
    return (KeySection){d->section, domain_keys, sizeof domain_keys / sizeof *domain_keys, d};
}

// Names end up in section headers, log lines and CSV columns: keep them plain.
static int name_is_valid(const char *name) {
    if (!name[0] || strlen(name) >= DATA_NAME_MAX) return 0;
    for (const char *p = name; *p; p++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.", *p))
            return 0;
    return 1;
}

DomainConfig *data_config_find_domain(DataConfig *cfg, const char *name) {
    for (int i = 0; i < cfg->n_domains; i++)
        if (!strcmp(cfg->domains[i].name, name)) return &cfg->domains[i];
    return NULL;
}

DomainConfig *data_config_add_domain(DataConfig *cfg, const char *name, char *err, size_t n) {
    if (!name_is_valid(name))
        return snprintf(err, n,
                        "[domain %s]: a domain name is 1 to %d characters of letters, digits, "
                        "'_', '-' and '.'",
                        name, DATA_NAME_MAX - 1),
               NULL;
    if (data_config_find_domain(cfg, name))
        return snprintf(err, n, "[domain %s]: a domain of that name is already configured",
                        name),
               NULL;
    if (cfg->n_domains == DATA_MAX_DOMAINS)
        return snprintf(err, n, "[domain %s]: more than %d domains", name, DATA_MAX_DOMAINS),
               NULL;
    DomainConfig *d = &cfg->domains[cfg->n_domains++];
    memset(d, 0, sizeof *d);
    strcpy(d->name, name);
    snprintf(d->section, sizeof d->section, "domain %s", name);
    KeySection s = data_domain_section(d);
    keys_set_defaults(&s);
    return d;
}

void data_config_use_default(DataConfig *cfg) {
    if (cfg->n_domains) return;
    char err[256];
    for (size_t i = 0; i < sizeof default_domains / sizeof *default_domains; i++) {
        DomainConfig *d = data_config_add_domain(cfg, default_domains[i], err, sizeof err);
        CHECK(d, "%s", err);
        // A truncated path simply fails to open later, naming itself.
        snprintf(d->train, sizeof d->train, "%.*s/%.16s/train.txt", KEY_STRING_MAX - 32,
                 cfg->default_dir, d->name);
        snprintf(d->val, sizeof d->val, "%.*s/%.16s/val.txt", KEY_STRING_MAX - 32,
                 cfg->default_dir, d->name);
    }
}

int data_config_validate(const DataConfig *cfg, char *err, size_t n) {
    for (int i = 0; i < cfg->n_domains; i++) {
        const DomainConfig *d = &cfg->domains[i];
        if (!d->train[0] && !d->text[0])
            return snprintf(err, n, "[%s]: train (or text) must name a file, directory or "
                                    "glob",
                            d->section),
                   -1;
        if (d->train[0] && d->text[0])
            return snprintf(err, n, "[%s]: set train or text, not both (text = '%s' is "
                                    "train = it with kind = text)",
                            d->section, d->text),
                   -1;
        if (d->text[0] && d->kind != DATA_TEXT)
            return snprintf(err, n, "[%s]: text = '%s' reads text; kind must be text",
                            d->section, d->text),
                   -1;
    }
    if (cfg->tokenizer != TOKENIZER_BYTES && !cfg->tokenizer_file[0])
        return snprintf(err, n, "data.tokenizer = %s needs data.tokenizer_file (its "
                                "tokenizer.json or .model)",
                        cfg->tokenizer == TOKENIZER_HF_BPE ? "hf-bpe" : "sentencepiece"),
               -1;
    return 0;
}

void data_config_write_ini(FILE *f, DataConfig *cfg) {
    KeySection s = data_config_section(cfg);
    keys_write_ini(f, &s);
    for (int i = 0; i < cfg->n_domains; i++) {
        fputc('\n', f);
        s = data_domain_section(&cfg->domains[i]);
        keys_write_ini(f, &s);
    }
}
