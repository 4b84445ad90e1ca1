// sources.h: a domain's train or val token stream, loaded into memory.
//
// A source spec is a file, a directory (every regular file below it whose name does not
// start with '.', sorted by path) or a glob(3) pattern (matches sorted; a matched
// directory is walked as above). Files are read in that order and concatenated as one
// stream of int32 token ids:
//   text    bytes, through the run's tokenizer (tokenizer.h; bytes by default)
//   shards  llm.c token shards: 1024-byte header of 256 little-endian int32 (magic
//           20240520, version 1, token count), then count little-endian uint16 tokens
//   hdf5    a 1-D integer dataset (any integer type) in each file
//   csv     one column of a CSV file with a header row (libcsv); each record's text
//           followed by '\n', through the tokenizer as text is
// Errors are about the user's files: one line naming the file and what is wrong,
// returned through (err, n) with -1.
#ifndef MOE_DATA_SOURCES_H
#define MOE_DATA_SOURCES_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "tokenizer.h"

#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1
#define SHARD_HEADER_BYTES 1024

typedef struct {
    int32_t *ids;   // (n) token ids; capacity cap
    size_t n, cap;
} TokenStream;

void token_stream_reserve(TokenStream *s, size_t extra);   // room for n + extra ids
void token_stream_append_bytes(TokenStream *s, const void *bytes, size_t n);
void token_stream_free(TokenStream *s);

typedef struct {
    char **paths;   // (n) sorted
    size_t n, cap;
} PathList;

void path_list_add(PathList *l, const char *path);
void path_list_sort(PathList *l);   // strcmp order, whatever the locale
void path_list_free(PathList *l);

// The files a spec names, sorted. Returns 0, or -1 when nothing matches.
int source_expand(const char *spec, PathList *out, char *err, size_t n);

// Appends every file of `spec` read as d->kind to out, checking that each id is below
// vocab. Text and CSV go through tok (each file encoded whole) unless tok is NULL or
// bytes. Errors name the file (the caller adds the domain).
int source_load(const DomainConfig *d, const char *spec, int vocab, Tokenizer *tok,
                TokenStream *out, char *err, size_t n);

// One file of each kind, appended to out.
int source_read_text(const char *path, TokenStream *out, char *err, size_t n);
int source_read_shard(const char *path, TokenStream *out, char *err, size_t n);
int source_read_hdf5(const char *path, const char *dataset, TokenStream *out, char *err,
                     size_t n);
int source_read_csv(const char *path, const char *column, TokenStream *out, char *err,
                    size_t n);

#endif
