// keys.h: typed configuration-key tables (the schema behind every INI section).
//
// A room that owns settings (model, optim, data, train) describes them once as a table of
// ConfigKey: name, type, default, allowed range or choices, one-line meaning. From the
// table come defaults, parsing with precise errors, --help text and the resolved config
// written into every run directory. INI syntax itself is libinih's job (train/config.c).
#ifndef MOE_KEYS_H
#define MOE_KEYS_H

#include <stddef.h>
#include <stdio.h>

typedef enum { KEY_INT, KEY_DOUBLE, KEY_BOOL, KEY_ENUM, KEY_STRING } KeyType;

#define KEY_STRING_MAX 2048   // room for an expanded ESFT expert list (~100 experts)

typedef struct {
    const char *name;      // key within its section
    KeyType type;
    size_t offset;         // offsetof() in the section's struct
    const char *def;       // default, as it would be written in the INI file
    double min, max;       // inclusive range (KEY_INT, KEY_DOUBLE)
    const char *choices;   // KEY_ENUM: "a|b|c" (value stored as the choice's index)
    const char *help;      // one line
} ConfigKey;

typedef struct {
    const char *section;   // INI section name
    const ConfigKey *keys;
    size_t n_keys;
    void *base;            // the struct the offsets point into
} KeySection;

// Fills every key of the section with its default.
void keys_set_defaults(const KeySection *s);
// Parses `value` into key `name`. Returns 0, or -1 with a one-line reason in err naming
// "section.key", the value and what is allowed (unknown keys list the valid ones). String
// values take the backslash escapes keys_format writes.
int keys_parse(const KeySection *s, const char *name, const char *value, char *err,
               size_t err_len);
// The key's current value as INI text, which keys_parse reads back: strings with
// backslash escapes for control characters, '\\', ';' and leading or trailing blanks.
void keys_format(const KeySection *s, const ConfigKey *k, char *out, size_t len);
// "[section]" then one "key = value" line per key.
void keys_write_ini(FILE *f, const KeySection *s);
// One line per key: section.key, default, allowed values, meaning.
void keys_print_help(FILE *f, const KeySection *s);

#endif
