#include "sources.h"

#include <dirent.h>
#include <errno.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../base/util.h"
#include "tokenizer.h"

// Deeper than any real corpus; stops a symlink loop from recursing forever.
#define SOURCE_MAX_DEPTH 32
#define TEXT_CHUNK (1 << 20)

void token_stream_reserve(TokenStream *s, size_t extra) {
    if (s->n + extra <= s->cap) return;
    size_t cap = s->cap * 2 > s->n + extra ? s->cap * 2 : s->n + extra;
    int32_t *ids = realloc(s->ids, cap * sizeof *ids);
    CHECK(ids, "out of memory growing a token stream to %zu ids", cap);
    s->ids = ids;
    s->cap = cap;
}

void token_stream_append_bytes(TokenStream *s, const void *bytes, size_t n) {
    // An empty CSV field comes as (NULL, 0), and an empty stream has no ids yet: the
    // pointer arithmetic below would be on NULL (undefined, even with offset 0).
    if (n == 0) return;
    token_stream_reserve(s, n);
    tokenizer_encode_bytes(bytes, n, s->ids + s->n);
    s->n += n;
}

void token_stream_free(TokenStream *s) {
    free(s->ids);
    *s = (TokenStream){0};
}

void path_list_add(PathList *l, const char *path) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        char **p = realloc(l->paths, l->cap * sizeof *p);
        CHECK(p, "out of memory listing files");
        l->paths = p;
    }
    l->paths[l->n] = strdup(path);
    CHECK(l->paths[l->n], "out of memory listing files");
    l->n++;
}

void path_list_free(PathList *l) {
    for (size_t i = 0; i < l->n; i++) free(l->paths[i]);
    free(l->paths);
    *l = (PathList){0};
}

static int compare_paths(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void path_list_sort(PathList *l) { qsort(l->paths, l->n, sizeof *l->paths, compare_paths); }

// Adds path (a file, or a directory walked recursively) to out.
static int expand_path(const char *path, int depth, PathList *out, char *err, size_t n) {
    struct stat st;
    if (stat(path, &st) != 0) return snprintf(err, n, "%s: %s", path, strerror(errno)), -1;
    if (S_ISREG(st.st_mode)) {
        path_list_add(out, path);
        return 0;
    }
    if (!S_ISDIR(st.st_mode))
        return snprintf(err, n, "%s: not a regular file or directory", path), -1;
    if (depth > SOURCE_MAX_DEPTH)
        return snprintf(err, n, "%s: directories nested deeper than %d (a symlink loop?)",
                        path, SOURCE_MAX_DEPTH),
               -1;
    DIR *dir = opendir(path);
    if (!dir) return snprintf(err, n, "%s: %s", path, strerror(errno)), -1;
    int rc = 0;
    for (struct dirent *e; rc == 0 && (e = readdir(dir));) {
        if (e->d_name[0] == '.') continue;   // ., .., and hidden files (editor swap files)
        size_t len = strlen(path) + strlen(e->d_name) + 2;
        char *child = CALLOC(len, 1);
        snprintf(child, len, "%s/%s", path, e->d_name);
        rc = expand_path(child, depth + 1, out, err, n);
        free(child);
    }
    closedir(dir);
    return rc;
}

static int expand_glob(const char *pattern, PathList *out, char *err, size_t n) {
    glob_t g;
    int rc = glob(pattern, GLOB_ERR, NULL, &g);
    if (rc == GLOB_NOMATCH) return snprintf(err, n, "%s: no file matches", pattern), -1;
    if (rc != 0) return snprintf(err, n, "%s: cannot expand the pattern", pattern), -1;
    for (size_t i = 0; rc == 0 && i < g.gl_pathc; i++)
        rc = expand_path(g.gl_pathv[i], 0, out, err, n);
    globfree(&g);
    return rc;
}

int source_expand(const char *spec, PathList *out, char *err, size_t n) {
    *out = (PathList){0};
    int rc = strpbrk(spec, "*?[") ? expand_glob(spec, out, err, n)
                                  : expand_path(spec, 0, out, err, n);
    if (rc == 0 && out->n == 0) rc = (snprintf(err, n, "%s: holds no file", spec), -1);
    if (rc != 0) {
        path_list_free(out);
        return -1;
    }
    path_list_sort(out);
    return 0;
}

int source_read_text(const char *path, TokenStream *out, char *err, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return snprintf(err, n, "%s: %s", path, strerror(errno)), -1;
    unsigned char *buf = CALLOC(TEXT_CHUNK, 1);
    size_t got;
    while ((got = fread(buf, 1, TEXT_CHUNK, f)) > 0) token_stream_append_bytes(out, buf, got);
    int failed = ferror(f);
    free(buf);
    fclose(f);
    if (failed) return snprintf(err, n, "%s: read error", path), -1;
    return 0;
}

static int read_file(const DomainConfig *d, const char *path, TokenStream *out, char *err,
                     size_t n) {
    switch (d->kind) {
    case DATA_TEXT: return source_read_text(path, out, err, n);
    case DATA_SHARDS: return source_read_shard(path, out, err, n);
    case DATA_HDF5: return source_read_hdf5(path, d->dataset, out, err, n);
    case DATA_CSV: return source_read_csv(path, d->column, out, err, n);
    }
    return snprintf(err, n, "%s: unknown source kind %d", path, d->kind), -1;
}

static int check_vocab(const char *path, const int32_t *ids, size_t count, int vocab,
                       char *err, size_t n) {
    for (size_t i = 0; i < count; i++)
        if (ids[i] < 0 || ids[i] >= vocab)
            return snprintf(err, n,
                            "%s: token id %d at position %zu is outside the vocabulary "
                            "(model.vocab = %d)",
                            path, ids[i], i, vocab),
                   -1;
    return 0;
}

// Text and CSV through a tokenizer: the file's bytes (as the byte-level reader gives
// them), then the tokenizer over them in one piece, so no word is cut at a read boundary.
static int read_tokenized(const DomainConfig *d, const char *path, Tokenizer *tok,
                          TokenStream *out, char *err, size_t n) {
    TokenStream raw = {0};
    if (read_file(d, path, &raw, err, n) != 0) {
        token_stream_free(&raw);
        return -1;
    }
    char *text = CALLOC(raw.n + 1, 1);
    tokenizer_decode_bytes(raw.ids, raw.n, text);
    char inner[512];
    int rc = tokenizer_encode(tok, text, raw.n, &out->ids, &out->n, &out->cap, inner,
                              sizeof inner);
    if (rc != 0) snprintf(err, n, "%s: %s", path, inner);
    free(text);
    token_stream_free(&raw);
    return rc;
}

int source_load(const DomainConfig *d, const char *spec, int vocab, Tokenizer *tok,
                TokenStream *out, char *err, size_t n) {
    PathList files;
    if (source_expand(spec, &files, err, n) != 0) return -1;
    int through = tok && tokenizer_kind(tok) != TOKENIZER_BYTES &&
                  (d->kind == DATA_TEXT || d->kind == DATA_CSV);
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < files.n; i++) {
        size_t start = out->n;
        rc = through ? read_tokenized(d, files.paths[i], tok, out, err, n)
                     : read_file(d, files.paths[i], out, err, n);
        if (rc == 0)
            rc = check_vocab(files.paths[i], out->ids + start, out->n - start, vocab, err, n);
    }
    path_list_free(&files);
    return rc;
}
