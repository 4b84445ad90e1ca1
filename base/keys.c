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

// String values are written with backslash escapes where INI text would lose or change
// them: control characters (a newline would end the line), the backslash itself, ';'
// (libinih's inline comment) and leading or trailing blanks (which libinih strips).
static int needs_escape(const char *text, size_t i, size_t len) {
    unsigned char c = (unsigned char)text[i];
    int edge = i == 0 || i + 1 == len;
    return c < 0x20 || c == 0x7f || c == '\\' || c == ';' || (edge && c == ' ');
}

// The escaped form of text into out (at most len bytes with the NUL); returns the full
// escaped length, as snprintf does.
static size_t escape_string(const char *text, char *out, size_t len) {
    size_t n = strlen(text), used = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)text[i];
        char e[8] = {(char)c, '\0'};
        if (needs_escape(text, i, n)) {
            const char *named = c == '\n' ? "\\n" : c == '\t' ? "\\t" : c == '\r' ? "\\r"
                                : c == '\\' ? "\\\\" : NULL;
            if (named) snprintf(e, sizeof e, "%s", named);
            else snprintf(e, sizeof e, "\\x%02x", c);
        }
        for (const char *q = e; *q; q++, used++)
            if (used + 1 < len) out[used] = *q;
    }
    if (len) out[used < len ? used : len - 1] = '\0';
    return used;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// Undoes escape_string (out holds at least strlen(text) + 1 bytes). Returns the offset
// of a bad escape, or -1 when the text is well formed.
static long unescape_string(const char *text, char *out) {
    size_t o = 0;
    for (size_t i = 0; text[i]; i++) {
        if (text[i] != '\\') {
            out[o++] = text[i];
            continue;
        }
        char c = text[i + 1];
        int hi = c == 'x' ? hex_digit(text[i + 2]) : -1;
        int lo = hi >= 0 ? hex_digit(text[i + 3]) : -1;
        if (c == 'n' || c == 't' || c == 'r' || c == '\\')
            out[o++] = c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : '\\';
        else if (lo >= 0 && (hi || lo))   // \x00 would end the string
            out[o++] = (char)(16 * hi + lo), i += 2;
        else
            return (long)i;
        i++;
    }
    out[o] = '\0';
    return -1;
}

// Unescapes value into the key's buffer; its escaped form (what config.ini and the
// checkpoint hold) must fit KEY_STRING_MAX as well.
static int parse_string(const KeySection *s, const ConfigKey *k, const char *value, char *p,
                        char *err, size_t err_len) {
    char *text = CALLOC(strlen(value) + 1, 1);
    long bad = unescape_string(value, text);
    int r = 0;
    if (bad >= 0) {
        snprintf(err, err_len, "%s.%s = '%s': bad escape at character %ld (string values "
                 "take \\\\, \\n, \\t, \\r and \\xHH)", s->section, k->name, value, bad + 1);
        r = -1;
    } else if (escape_string(text, NULL, 0) >= KEY_STRING_MAX) {
        snprintf(err, err_len, "%s.%s: value longer than %d characters (escapes included)",
                 s->section, k->name, KEY_STRING_MAX - 1);
        r = -1;
    } else {
        strcpy(p, text);
    }
    free(text);
    return r;
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
    char shown[256];   // the value in a one-line message: a newline shows as \n
    escape_string(value, shown, sizeof shown);
    switch (k->type) {
    case KEY_INT:
    case KEY_DOUBLE: {
        double v;
        if (util_parse_number(value, k->type == KEY_INT, &v) != 0) {
            snprintf(err, err_len, "%s.%s = '%s': expected %s", s->section, name, shown,
                     k->type == KEY_INT ? "an integer" : "a finite number");
            return -1;
        }
        if (v < k->min || v > k->max) {
            snprintf(err, err_len, "%s.%s = %s: out of range, allowed %.*f to %.*f", s->section,
                     name, shown, k->type == KEY_INT ? 0 : 6, k->min, k->type == KEY_INT ? 0 : 6,
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
                     shown);
            return -1;
        }
        return 0;
    case KEY_ENUM: {
        int idx = choice_index(k->choices, value);
        if (idx < 0) {
            snprintf(err, err_len, "%s.%s = '%s': expected one of %s", s->section, name, shown,
                     k->choices);
            return -1;
        }
        *(int *)p = idx;
        return 0;
    }
    case KEY_STRING:
        return parse_string(s, k, value, (char *)p, err, err_len);
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
    case KEY_STRING: escape_string((const char *)p, out, len); break;
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
