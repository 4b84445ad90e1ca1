// shards.c: llm.c token shards (the format of llm.c's dev/data/*.py, GPT-2 uint16 tokens).
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../base/util.h"
#include "sources.h"

#define SHARD_CHUNK (1 << 20)   // tokens decoded per read

// The format is little-endian whatever the host, so decode bytes explicitly.
static int32_t le32(const unsigned char *p) {
    return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                     (uint32_t)p[3] << 24);
}

// Checks the header against the file size. Returns the token count, or -1 with err set.
static long long shard_check_header(const char *path, const unsigned char *h, long long size,
                                    char *err, size_t n) {
    int32_t magic = le32(h), version = le32(h + 4), count = le32(h + 8);
    if (magic != SHARD_MAGIC)
        return snprintf(err, n, "%s: bad magic %d (expected %d): not an llm.c token shard",
                        path, magic, SHARD_MAGIC),
               -1;
    if (version != SHARD_VERSION)
        return snprintf(err, n,
                        "%s: unsupported version %d (expected %d: uint16 tokens)", path,
                        version, SHARD_VERSION),
               -1;
    if (count < 0)
        return snprintf(err, n, "%s: bad token count %d in the header", path, count), -1;
    long long expected = SHARD_HEADER_BYTES + 2LL * count;
    if (size < expected)
        return snprintf(err, n,
                        "%s: truncated: header says %d tokens (%lld bytes) but the file has "
                        "%lld bytes",
                        path, count, expected, size),
               -1;
    if (size > expected)
        return snprintf(err, n, "%s: %lld trailing bytes after the %d tokens the header "
                                "announces",
                        path, size - expected, count),
               -1;
    return count;
}

static int shard_read_tokens(FILE *f, const char *path, size_t count, TokenStream *out,
                             char *err, size_t n) {
    token_stream_reserve(out, count);
    unsigned char *buf = CALLOC(SHARD_CHUNK, 2);
    int rc = 0;
    for (size_t done = 0; done < count;) {
        size_t want = count - done < SHARD_CHUNK ? count - done : SHARD_CHUNK;
        if (fread(buf, 2, want, f) != want) {
            rc = (snprintf(err, n, "%s: read error after %zu tokens", path, done), -1);
            break;
        }
        int32_t *ids = out->ids + out->n;
        for (size_t i = 0; i < want; i++) ids[i] = buf[2 * i] | buf[2 * i + 1] << 8;
        out->n += want;
        done += want;
    }
    free(buf);
    return rc;
}

int source_read_shard(const char *path, TokenStream *out, char *err, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return snprintf(err, n, "%s: %s", path, strerror(errno)), -1;
    struct stat st;
    unsigned char header[SHARD_HEADER_BYTES];
    int rc = -1;
    if (fstat(fileno(f), &st) != 0)
        snprintf(err, n, "%s: %s", path, strerror(errno));
    else if (st.st_size < SHARD_HEADER_BYTES)
        snprintf(err, n, "%s: %lld bytes, shorter than the %d-byte header: not an llm.c "
                         "token shard",
                 path, (long long)st.st_size, SHARD_HEADER_BYTES);
    else if (fread(header, 1, sizeof header, f) != sizeof header)
        snprintf(err, n, "%s: cannot read the header", path);
    else {
        long long count = shard_check_header(path, header, (long long)st.st_size, err, n);
        if (count >= 0) rc = shard_read_tokens(f, path, (size_t)count, out, err, n);
    }
    fclose(f);
    return rc;
}
