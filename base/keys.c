#include "keys.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

static void *key_ptr(const KeySection *s, const ConfigKey *k) {
    return (char *)s->base + k->offset;
}

// Index of `value` among "a|b|c", or -1.
static int choice_index(const char *choices, const char *value) {
    size_t len = strlen(value);
    int idx = 0;
    for (const char *p = choices; *p; idx++) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == len && strncmp(p, value, n) == 0) return idx;
        if (!bar) break;
        p = bar + 1;
    }
    return -1;
}

static void choice_name(const char *choices, int idx, char *out, size_t len) {
    const char *p = choices;
    for (int i = 0; i < idx && p; i++) {
        p = strchr(p, '|');
        if (p) p++;
    }
    size_t n = p ? strcspn(p, "|") : 0;
    if (n >= len) n = len - 1;
    memcpy(out, p ? p : "", n);
    out[n] = '\0';
}

static int parse_bool(const char *v, int *out) {
    if (!strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "1") || !strcmp(v, "on")) {
        *out = 1;
        return 0;
    }
    if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "0") || !strcmp(v, "off")) {
        *out = 0;
        return 0;
    }
    return -1;
}

static const ConfigKey *key_find(const KeySection *s, const char *name) {
    for (size_t i = 0; i < s->n_keys; i++)
        if (!strcmp(s->keys[i].name, name)) return &s->keys[i];
    return NULL;
}

static void key_names(const KeySection *s, char *out, size_t len) {
    out[0] = '\0';
    for (size_t i = 0; i < s->n_keys; i++) {
        size_t used = strlen(out);
        snprintf(out + used, len - used, "%s%s", i ? ", " : "", s->keys[i].name);
    }
}

int keys_parse(const KeySection *s, const char *name, const char *value, char *err,
               size_t err_len) {
    const ConfigKey *k = key_find(s, name);
    if (!k) {
        char names[1024];
        key_names(s, names, sizeof names);
        snprintf(err, err_len, "unknown key '%s.%s'; [%s] accepts: %s", s->section, name,
                 s->section, names);
        return -1;
    }
    void *p = key_ptr(s, k);
    switch (k->type) {
    case KEY_INT:
    case KEY_DOUBLE: {
        double v;
        if (util_parse_number(value, k->type == KEY_INT, &v) != 0) {
            snprintf(err, err_len, "%s.%s = '%s': expected %s", s->section, name, value,
                     k->type == KEY_INT ? "an integer" : "a finite number");
            return -1;
        }
        if (v < k->min || v > k->max) {
            snprintf(err, err_len, "%s.%s = %s: out of range, allowed %.*f to %.*f", s->section,
                     name, value, k->type == KEY_INT ? 0 : 6, k->min, k->type == KEY_INT ? 0 : 6,
                     k->max);
            return -1;
        }
        if (k->type == KEY_INT) *(int *)p = (int)v;
        else *(double *)p = v;
        return 0;
    }
    case KEY_BOOL:
        if (parse_bool(value, (int *)p) != 0) {
            snprintf(err, err_len, "%s.%s = '%s': expected true or false", s->section, name,
                     value);
            return -1;
        }
        return 0;
    case KEY_ENUM: {
        int idx = choice_index(k->choices, value);
        if (idx < 0) {
            snprintf(err, err_len, "%s.%s = '%s': expected one of %s", s->section, name, value,
                     k->choices);
            return -1;
        }
        *(int *)p = idx;
        return 0;
    }
    case KEY_STRING:
        if (strlen(value) >= KEY_STRING_MAX) {
            snprintf(err, err_len, "%s.%s: value longer than %d characters", s->section, name,
                     KEY_STRING_MAX - 1);
            return -1;
        }
        strcpy((char *)p, value);
        return 0;
    }
    snprintf(err, err_len, "%s.%s: unknown key type", s->section, name);
    return -1;
}

void keys_set_defaults(const KeySection *s) {
    char err[512];
    for (size_t i = 0; i < s->n_keys; i++)
        if (keys_parse(s, s->keys[i].name, s->keys[i].def, err, sizeof err) != 0)
            DIE("bad built-in default: %s", err);
}

void keys_format(const KeySection *s, const ConfigKey *k, char *out, size_t len) {
    const void *p = key_ptr(s, k);
    switch (k->type) {
    case KEY_INT: snprintf(out, len, "%d", *(const int *)p); break;
    case KEY_DOUBLE: snprintf(out, len, "%.17g", *(const double *)p); break;
    case KEY_BOOL: snprintf(out, len, "%s", *(const int *)p ? "true" : "false"); break;
    case KEY_ENUM: choice_name(k->choices, *(const int *)p, out, len); break;
    case KEY_STRING: snprintf(out, len, "%s", (const char *)p); break;
    }
}

void keys_write_ini(FILE *f, const KeySection *s) {
    char v[KEY_STRING_MAX + 32];
    fprintf(f, "[%s]\n", s->section);
    for (size_t i = 0; i < s->n_keys; i++) {
        keys_format(s, &s->keys[i], v, sizeof v);
        fprintf(f, "%s = %s\n", s->keys[i].name, v);
    }
}

void keys_print_help(FILE *f, const KeySection *s) {
    for (size_t i = 0; i < s->n_keys; i++) {
        const ConfigKey *k = &s->keys[i];
        char full[96], allowed[128];
        snprintf(full, sizeof full, "%s.%s", s->section, k->name);
        switch (k->type) {
        case KEY_INT: snprintf(allowed, sizeof allowed, "%.0f..%.0f", k->min, k->max); break;
        case KEY_DOUBLE: snprintf(allowed, sizeof allowed, "%g..%g", k->min, k->max); break;
        case KEY_BOOL: snprintf(allowed, sizeof allowed, "true|false"); break;
        case KEY_ENUM: snprintf(allowed, sizeof allowed, "%s", k->choices); break;
        case KEY_STRING: snprintf(allowed, sizeof allowed, "text"); break;
        }
        fprintf(f, "  %-28s %-12s %-22s %s\n", full, k->def[0] ? k->def : "\"\"", allowed, k->help);
    }
}
