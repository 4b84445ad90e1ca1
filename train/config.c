#include "config.h"

#include <ini.h>
#include <string.h>

#define TK(field) offsetof(TrainConfig, field)

static const ConfigKey train_keys[] = {
    {"batch_size", KEY_INT, TK(batch_size), "8", 1, 1 << 20, NULL, "sequences per step B"},
    {"seed", KEY_INT, TK(seed), "1337", 0, 2147483647, NULL,
     "seed for weights, data order and router noise"},
};

void run_config_sections(RunConfig *rc, KeySection out[RUN_CONFIG_SECTIONS]) {
    model_config_sections(&rc->model, out);
    out[MODEL_CONFIG_SECTIONS] =
        (KeySection){"train", train_keys, sizeof train_keys / sizeof *train_keys, &rc->train};
}

void run_config_defaults(RunConfig *rc) {
    KeySection s[RUN_CONFIG_SECTIONS];
    run_config_sections(rc, s);
    for (int i = 0; i < RUN_CONFIG_SECTIONS; i++) keys_set_defaults(&s[i]);
}

static int set_key(RunConfig *rc, const char *section, const char *key, const char *value,
                   char *err, size_t err_len) {
    KeySection s[RUN_CONFIG_SECTIONS];
    run_config_sections(rc, s);
    for (int i = 0; i < RUN_CONFIG_SECTIONS; i++)
        if (!strcmp(s[i].section, section)) return keys_parse(&s[i], key, value, err, err_len);
    snprintf(err, err_len, "unknown section [%s]; sections are model, router, train", section);
    return -1;
}

typedef struct {
    RunConfig *rc;
    char *err;
    size_t err_len;
} IniCtx;

static int config_ini_key(void *user, const char *section, const char *name, const char *value) {
    IniCtx *ctx = user;
    return set_key(ctx->rc, section, name, value, ctx->err, ctx->err_len) == 0;
}

int run_config_load_ini(RunConfig *rc, const char *path, char *err, size_t err_len) {
    char inner[512] = "";
    IniCtx ctx = {rc, inner, sizeof inner};
    int line = ini_parse(path, config_ini_key, &ctx);
    if (line == -1) return snprintf(err, err_len, "%s: cannot open config file", path), -1;
    if (line > 0) {
        if (!inner[0]) snprintf(inner, sizeof inner, "syntax error");
        return snprintf(err, err_len, "%s:%d: %s", path, line, inner), -1;
    }
    return 0;
}

int run_config_override(RunConfig *rc, const char *word, char *err, size_t err_len) {
    const char *eq = strchr(word, '=');
    const char *dot = strchr(word, '.');
    if (!eq || !dot || dot > eq)
        return snprintf(err, err_len, "override '%s': expected section.key=value", word), -1;
    char section[64], key[64];
    size_t ns = (size_t)(dot - word), nk = (size_t)(eq - dot - 1);
    if (ns >= sizeof section || nk >= sizeof key)
        return snprintf(err, err_len, "override '%s': name too long", word), -1;
    memcpy(section, word, ns);
    section[ns] = '\0';
    memcpy(key, dot + 1, nk);
    key[nk] = '\0';
    return set_key(rc, section, key, eq + 1, err, err_len);
}

int run_config_validate(const RunConfig *rc, char *err, size_t err_len) {
    return model_config_validate(&rc->model, err, err_len);
}

void run_config_write_ini(FILE *f, RunConfig *rc) {
    KeySection s[RUN_CONFIG_SECTIONS];
    run_config_sections(rc, s);
    for (int i = 0; i < RUN_CONFIG_SECTIONS; i++) {
        keys_write_ini(f, &s[i]);
        fputc('\n', f);
    }
}

void run_config_print_help(FILE *f) {
    RunConfig rc;
    KeySection s[RUN_CONFIG_SECTIONS];
    run_config_sections(&rc, s);
    fprintf(f, "  %-28s %-10s %-22s %s\n", "key", "default", "allowed", "meaning");
    for (int i = 0; i < RUN_CONFIG_SECTIONS; i++) keys_print_help(f, &s[i]);
}
