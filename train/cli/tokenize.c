#include "tokenize.h"

#include <errno.h>
#include <hdf5.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "../../base/util.h"
#include "../../data/sources.h"
#include "../../data/spm.h"
#include "../../data/tokenizer.h"

// HDF5 output grows in chunks of this many ids.
#define H5_OUT_CHUNK ((hsize_t)1 << 16)

static int ends_with(const char *s, const char *tail) {
    size_t n = strlen(s), k = strlen(tail);
    return n >= k && !strcmp(s + n - k, tail);
}

// TOKENIZER: "bytes", a tokenizer.json (hf-bpe) or a .model (sentencepiece).
static Tokenizer *open_named(const char *spec) {
    char err[1024];
    int kind = !strcmp(spec, "bytes")        ? TOKENIZER_BYTES
               : ends_with(spec, ".json")    ? TOKENIZER_HF_BPE
               : ends_with(spec, ".model")   ? TOKENIZER_SENTENCEPIECE
                                             : -1;
    if (kind < 0)
        FAIL("%s: not a tokenizer: name 'bytes', a tokenizer.json (hf-bpe) or a .model file "
             "(sentencepiece)", spec);
    Tokenizer *t = tokenizer_open(kind, spec, err, sizeof err);
    if (!t) FAIL("%s", err);
    return t;
}

typedef struct {
    const char *path;
    FILE *bin;      // .bin: llm.c shard
    hid_t h5, ds;   // .h5: dataset "tokens"
    size_t count;
} TokenSink;

static void sink_open(TokenSink *s, const char *path) {
    *s = (TokenSink){.path = path, .h5 = -1, .ds = -1};
    if (ends_with(path, ".bin")) {
        s->bin = fopen(path, "wb");
        if (!s->bin) FAIL("%s: cannot create: %s", path, strerror(errno));
        static const unsigned char zeros[SHARD_HEADER_BYTES];
        fwrite(zeros, 1, sizeof zeros, s->bin);
        return;
    }
    if (!ends_with(path, ".h5") && !ends_with(path, ".hdf5"))
        FAIL("--out %s: name an llm.c shard (.bin) or an HDF5 file (.h5)", path);
    s->h5 = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (s->h5 < 0) FAIL("%s: cannot create the HDF5 file", path);
    hsize_t zero = 0, unlimited = H5S_UNLIMITED, chunk = H5_OUT_CHUNK;
    hid_t space = H5Screate_simple(1, &zero, &unlimited), plist = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_chunk(plist, 1, &chunk);
    s->ds = H5Dcreate2(s->h5, "tokens", H5T_STD_I32LE, space, H5P_DEFAULT, plist, H5P_DEFAULT);
    H5Pclose(plist);
    H5Sclose(space);
    if (s->ds < 0) FAIL("%s: cannot create the dataset 'tokens'", path);
}

static void put_le(unsigned char *p, uint32_t v, int bytes) {
    for (int i = 0; i < bytes; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void sink_write(TokenSink *s, const int32_t *ids, size_t n) {
    if (s->bin) {
        unsigned char two[2];
        for (size_t i = 0; i < n; i++) {
            if (ids[i] < 0 || ids[i] > 65535)
                FAIL("%s: token id %d does not fit an llm.c shard's uint16\nHINT: write HDF5 "
                     "(--out FILE.h5)", s->path, ids[i]);
            put_le(two, (uint32_t)ids[i], 2);
            fwrite(two, 1, 2, s->bin);
        }
    } else if (n) {
        hsize_t start = s->count, want = n, total = s->count + n;
        hid_t space;
        if (H5Dset_extent(s->ds, &total) < 0 || (space = H5Dget_space(s->ds)) < 0)
            FAIL("%s: cannot grow the dataset 'tokens'", s->path);
        hid_t mem = H5Screate_simple(1, &want, NULL);
        int bad = H5Sselect_hyperslab(space, H5S_SELECT_SET, &start, NULL, &want, NULL) < 0 ||
                  H5Dwrite(s->ds, H5T_NATIVE_INT32, mem, space, H5P_DEFAULT, ids) < 0;
        H5Sclose(mem);
        H5Sclose(space);
        if (bad) FAIL("%s: cannot write tokens", s->path);
    }
    s->count += n;
}

static void sink_close(TokenSink *s) {
    if (s->bin) {
        if (s->count > INT32_MAX)
            FAIL("%s: %zu tokens are more than an llm.c shard's header counts\nHINT: split the "
                 "input over several --out files", s->path, s->count);
        unsigned char h[12];
        put_le(h, SHARD_MAGIC, 4);
        put_le(h + 4, SHARD_VERSION, 4);
        put_le(h + 8, (uint32_t)s->count, 4);
        if (fseek(s->bin, 0, SEEK_SET) != 0 || fwrite(h, 1, sizeof h, s->bin) != sizeof h ||
            ferror(s->bin) | fclose(s->bin))
            FAIL("%s: cannot write: %s", s->path, strerror(errno));
        return;
    }
    if (H5Dclose(s->ds) < 0 || H5Fclose(s->h5) < 0) FAIL("%s: cannot close the HDF5 file", s->path);
}

static char *read_all(const char *path, size_t *len) {
    TokenStream raw = {0};
    char err[1024];
    if (source_read_text(path, &raw, err, sizeof err) != 0) FAIL("%s", err);
    char *text = CALLOC(raw.n + 1, 1);
    tokenizer_decode_bytes(raw.ids, raw.n, text);
    *len = raw.n;
    token_stream_free(&raw);
    return text;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static long long file_bytes(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 ? (long long)sb.st_size : 0;
}

// `moe tokenize TOKENIZER INPUT... --out FILE`
int tokenize_main(int argc, char **argv) {
    if (argc < 4 || !strcmp(argv[1], "--help") || strcmp(argv[argc - 2], "--out")) {
        printf("usage: moe tokenize TOKENIZER INPUT... --out FILE.bin|FILE.h5\n"
               "  Encodes text files (a file, directory or glob each; every file whole, in\n"
               "  sorted order) with TOKENIZER: 'bytes', a tokenizer.json (hf-bpe) or a\n"
               "  SentencePiece .model. Writes one llm.c shard (.bin, uint16 ids; for\n"
               "  [domain] kind = shards) or HDF5 (.h5, int32 dataset 'tokens'; kind = hdf5).\n");
        return argc > 1 && !strcmp(argv[1], "--help") ? 0 : 2;
    }
    Tokenizer *tok = open_named(argv[1]);
    PathList files = {0};
    char err[1024];
    for (int i = 2; i < argc - 2; i++) {
        PathList one;
        if (source_expand(argv[i], &one, err, sizeof err) != 0) FAIL("%s", err);
        for (size_t j = 0; j < one.n; j++) path_list_add(&files, one.paths[j]);
        path_list_free(&one);
    }
    long long total = 0, done = 0;
    for (size_t i = 0; i < files.n; i++) total += file_bytes(files.paths[i]);
    TokenSink sink;
    sink_open(&sink, argv[argc - 1]);
    double t0 = now_s();
    for (size_t i = 0; i < files.n; i++) {
        size_t len, n_ids = 0, cap = 0;
        char *text = read_all(files.paths[i], &len);
        int32_t *ids = NULL;
        if (tokenizer_encode(tok, text, len, &ids, &n_ids, &cap, err, sizeof err) != 0)
            FAIL("%s: %s", files.paths[i], err);
        sink_write(&sink, ids, n_ids);
        free(ids);
        free(text);
        done += (long long)len;
        double s = now_s() - t0;
        fprintf(stderr, "\rtokenize: file %zu/%zu, %.1f of %.1f MB, %zu tokens, %.2f MB/s   ",
                i + 1, files.n, (double)done / 1e6, (double)total / 1e6, sink.count,
                s > 0 ? (double)done / 1e6 / s : 0.0);
    }
    fprintf(stderr, "\n");
    sink_close(&sink);
    printf("%s: %zu tokens from %zu files (%lld bytes, %.2f bytes per token)\n", argv[argc - 1],
           sink.count, files.n, done, sink.count ? (double)done / (double)sink.count : 0.0);
    path_list_free(&files);
    tokenizer_free(tok);
    return 0;
}

// `moe tokenizer train INPUT... --vocab-size N --out PREFIX`
static int train_spm(int argc, char **argv) {
    int vocab = 0;
    const char *prefix = NULL;
    const char **inputs = CALLOC((size_t)argc, sizeof *inputs);
    size_t n_inputs = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--vocab-size") && i + 1 < argc)
            vocab = (int)util_arg_number(argv[i], argv[i + 1], 8, 1 << 20, 1), i++;
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) prefix = argv[++i];
        else if (argv[i][0] == '-') FAIL("moe tokenizer train: unknown option %s", argv[i]);
        else inputs[n_inputs++] = argv[i];
    }
    if (!n_inputs || !vocab || !prefix)
        FAIL("usage: moe tokenizer train INPUT... --vocab-size N --out PREFIX");
    char err[1024];
    for (size_t i = 0; i < n_inputs; i++) {
        FILE *f = fopen(inputs[i], "rb");
        if (!f) FAIL("%s: %s", inputs[i], strerror(errno));
        fclose(f);
    }
    if (spm_train_bpe(inputs, n_inputs, vocab, prefix, err, sizeof err) != 0) FAIL("%s", err);
    printf("wrote %s.model (SentencePiece BPE, %d pieces) and %s.vocab\n", prefix, vocab, prefix);
    free(inputs);
    return 0;
}

// `moe tokenizer encode TOKENIZER TEXT OUT` and `moe tokenizer decode TOKENIZER IDS`.
static int encode_one(char **argv) {
    char *words[] = {"tokenize", argv[2], argv[3], "--out", argv[4]};
    return tokenize_main(5, words);
}

static int decode_one(char **argv) {
    Tokenizer *tok = open_named(argv[2]);
    TokenStream ids = {0};
    char err[1024];
    int rc = ends_with(argv[3], ".bin") ? source_read_shard(argv[3], &ids, err, sizeof err)
                                        : source_read_hdf5(argv[3], "tokens", &ids, err, sizeof err);
    if (rc != 0) FAIL("%s", err);
    size_t len;
    char *text = tokenizer_decode(tok, ids.ids, ids.n, &len);
    fwrite(text, 1, len, stdout);
    free(text);
    token_stream_free(&ids);
    tokenizer_free(tok);
    return 0;
}

int tokenizer_main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "train")) return train_spm(argc, argv);
    if (argc == 5 && !strcmp(argv[1], "encode")) return encode_one(argv);
    if (argc == 4 && !strcmp(argv[1], "decode")) return decode_one(argv);
    printf("usage: moe tokenizer train INPUT... --vocab-size N --out PREFIX\n"
           "         SentencePiece BPE (libsentencepiece's trainer) of N pieces: PREFIX.model\n"
           "         (identity normalisation, whitespace kept, byte fallback: text decodes\n"
           "         back exactly)\n"
           "       moe tokenizer encode TOKENIZER TEXT OUT.bin|OUT.h5   (moe tokenize)\n"
           "       moe tokenizer decode TOKENIZER IDS.bin|IDS.h5        the text, to stdout\n");
    return argc == 2 && !strcmp(argv[1], "--help") ? 0 : 2;
}
