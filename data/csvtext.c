// csvtext.c: one text column of a CSV file (header row first), parsed with libcsv.
#include <csv.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "sources.h"

#define CSV_CHUNK (1 << 16)

typedef struct {
    const char *path, *column;
    TokenStream *out;
    size_t record;       // records finished (the header is record 0)
    size_t field;        // fields seen in the current record
    long col;            // index of `column`, -1 until the header names it
    char names[512];     // header names, for the missing-column error
    char *err;
    size_t n;
    int failed;
} CsvReader;

static void csv_header_field(CsvReader *r, const char *name, size_t len) {
    // A UTF-8 byte-order mark (spreadsheet exports) is not part of the first name.
    if (r->field == 0 && len >= 3 && !memcmp(name, "\xEF\xBB\xBF", 3)) name += 3, len -= 3;
    if (r->col < 0 && strlen(r->column) == len && !memcmp(name, r->column, len))
        r->col = (long)r->field;
    size_t used = strlen(r->names);
    snprintf(r->names + used, sizeof r->names - used, "%s'%.*s'", r->field ? ", " : "",
             (int)len, name);
}

static void csv_on_field(void *data, size_t len, void *user) {
    CsvReader *r = user;
    if (r->failed) return;
    if (r->record == 0) csv_header_field(r, data ? data : "", data ? len : 0);
    else if ((long)r->field == r->col) {
        token_stream_append_bytes(r->out, data, len);
        token_stream_append_bytes(r->out, "\n", 1);
    }
    r->field++;
}

static void csv_on_record(int terminator, void *user) {
    (void)terminator;
    CsvReader *r = user;
    if (r->failed) return;
    if (r->record == 0 && r->col < 0) {
        r->failed = 1;
        snprintf(r->err, r->n, "%s: no column '%s' in the header; columns are %s", r->path,
                 r->column, r->names);
    } else if (r->record > 0 && (long)r->field <= r->col) {
        r->failed = 1;
        snprintf(r->err, r->n, "%s: record %zu has %zu fields, so no column '%s' (field %ld)",
                 r->path, r->record + 1, r->field, r->column, r->col + 1);
    }
    r->record++;
    r->field = 0;
}

// Text is data: keep the spaces around unquoted fields that libcsv trims by default.
static int csv_no_space(unsigned char c) {
    (void)c;
    return 0;
}

static int csv_parse_file(FILE *f, struct csv_parser *p, CsvReader *r) {
    char *buf = CALLOC(CSV_CHUNK, 1);
    size_t got;
    while (!r->failed && (got = fread(buf, 1, CSV_CHUNK, f)) > 0)
        if (csv_parse(p, buf, got, csv_on_field, csv_on_record, r) != got) break;
    int read_failed = ferror(f);
    free(buf);
    if (r->failed) return -1;
    if (read_failed) return snprintf(r->err, r->n, "%s: read error", r->path), -1;
    if (csv_error(p) != CSV_SUCCESS || csv_fini(p, csv_on_field, csv_on_record, r) != 0)
        return snprintf(r->err, r->n, "%s: CSV error after record %zu: %s", r->path,
                        r->record, csv_strerror(csv_error(p))),
               -1;
    if (r->failed) return -1;
    if (r->record == 0) return snprintf(r->err, r->n, "%s: empty, no header row", r->path), -1;
    return 0;
}

int source_read_csv(const char *path, const char *column, TokenStream *out, char *err,
                    size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return snprintf(err, n, "%s: %s", path, strerror(errno)), -1;
    struct csv_parser p;
    if (csv_init(&p, CSV_STRICT | CSV_STRICT_FINI | CSV_APPEND_NULL) != 0)
        DIE("out of memory initialising the CSV parser");
    csv_set_space_func(&p, csv_no_space);
    CsvReader r = {.path = path, .column = column, .out = out, .col = -1, .err = err, .n = n};
    int rc = csv_parse_file(f, &p, &r);
    csv_free(&p);
    fclose(f);
    return rc;
}
