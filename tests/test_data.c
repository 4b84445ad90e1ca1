// test_data.c: the data room: config keys, sources (text, llm.c shards, HDF5, CSV), the
// loader's sampling, determinism and validation windows, and the default-corpus manifest.
// Every test writes its fixtures into its own mkdtemp directory, removed by teardown.
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "../data/config.h"
#include "../data/loader.h"
#include "../data/prepare.h"
#include "../data/sources.h"
#include "../data/tokenizer.h"
#include "testlib.h"

// ---- fixtures ------------------------------------------------------------------------

static int fixture_setup(void **state) {
    char *dir = strdup("/tmp/moe-test-data-XXXXXX");
    if (!mkdtemp(dir)) return -1;
    *state = dir;
    return 0;
}

static int fixture_teardown(void **state) {
    int rc = test_remove_tree(*state);
    free(*state);
    return rc;
}

#define FIXTURE_TEST(f) cmocka_unit_test_setup_teardown(f, fixture_setup, fixture_teardown)

// dir/name (static buffer: use before the next call).
static const char *fixture_path(void **state, const char *name) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", (const char *)*state, name);
    return path;
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void write_text(void **state, const char *name, const char *text) {
    write_bytes(fixture_path(state, name), text, strlen(text));
}

// A text file of n bytes, byte i = (i + offset) % modulus + base.
static void write_pattern(void **state, const char *name, size_t n, int base, int modulus,
                          size_t offset) {
    unsigned char *b = malloc(n);
    for (size_t i = 0; i < n; i++) b[i] = (unsigned char)((i + offset) % (size_t)modulus + base);
    write_bytes(fixture_path(state, name), b, n);
    free(b);
}

static void put_le32(unsigned char *p, int32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)((uint32_t)v >> (8 * i));
}

// An llm.c shard with the given header fields, then the tokens, then `extra` zero bytes.
static void write_shard(const char *path, int32_t magic, int32_t version, int32_t count,
                        const uint16_t *tokens, size_t n, size_t extra) {
    size_t bytes = SHARD_HEADER_BYTES + 2 * n + extra;
    unsigned char *b = calloc(bytes, 1);
    put_le32(b, magic);
    put_le32(b + 4, version);
    put_le32(b + 8, count);
    for (size_t i = 0; i < n; i++) {
        b[SHARD_HEADER_BYTES + 2 * i] = (unsigned char)(tokens[i] & 0xff);
        b[SHARD_HEADER_BYTES + 2 * i + 1] = (unsigned char)(tokens[i] >> 8);
    }
    write_bytes(path, b, bytes);
    free(b);
}

static DomainConfig *add_domain(DataConfig *cfg, const char *name, int kind, const char *train,
                                const char *val, double weight) {
    char err[256];
    DomainConfig *d = data_config_add_domain(cfg, name, err, sizeof err);
    assert_non_null(d);
    d->kind = kind;
    snprintf(d->train, sizeof d->train, "%s", train);
    snprintf(d->val, sizeof d->val, "%s", val);
    d->weight = weight;
    return d;
}

static void assert_contains(const char *text, const char *part) {
    if (!strstr(text, part)) fail_msg("expected '%s' in: %s", part, text);
}

// Loads one file of `kind` through source_load (vocab 1 << 20) into s.
static int load_one(int kind, const char *path, const char *key, TokenStream *s, char *err,
                    size_t n) {
    DataConfig cfg;
    data_config_defaults(&cfg);
    DomainConfig *d = add_domain(&cfg, "x", kind, path, path, 1);
    if (kind == DATA_HDF5) snprintf(d->dataset, sizeof d->dataset, "%s", key);
    if (kind == DATA_CSV) snprintf(d->column, sizeof d->column, "%s", key);
    *s = (TokenStream){0};
    return source_load(d, path, 1 << 20, NULL, s, err, n);
}

static void assert_stream_text(const TokenStream *s, const char *expected) {
    size_t n = strlen(expected);
    char *got = calloc(s->n + 1, 1);
    tokenizer_decode_bytes(s->ids, s->n, got);
    if (s->n != n || memcmp(got, expected, n))
        fail_msg("stream is '%s' (%zu tokens), expected '%s'", got, s->n, expected);
    free(got);
}

// ---- config and tokenizer ----------------------------------------------------------

static void test_config_keys(void **state) {
    (void)state;
    DataConfig cfg;
    char err[512];
    data_config_defaults(&cfg);
    assert_int_equal(cfg.val_tokens, 65536);
    assert_string_equal(cfg.default_dir, "data/default");
    KeySection data = data_config_section(&cfg);
    assert_int_equal(keys_parse(&data, "val_tokens", "4096", err, sizeof err), 0);
    assert_int_equal(cfg.val_tokens, 4096);

    DomainConfig *d = data_config_add_domain(&cfg, "web", err, sizeof err);
    assert_non_null(d);
    assert_string_equal(d->dataset, "tokens");
    assert_string_equal(d->column, "text");
    assert_true(d->weight == 1.0 && d->kind == DATA_TEXT);
    KeySection s = data_domain_section(d);
    assert_string_equal(s.section, "domain web");
    assert_int_equal(keys_parse(&s, "kind", "csv", err, sizeof err), 0);
    assert_int_equal(d->kind, DATA_CSV);
    assert_int_equal(keys_parse(&s, "weight", "-1", err, sizeof err), -1);
    assert_contains(err, "domain web.weight");
    assert_int_equal(keys_parse(&s, "weight", "0", err, sizeof err), 0);
    assert_int_equal(keys_parse(&s, "kind", "parquet", err, sizeof err), -1);
    assert_contains(err, "text|shards|hdf5|csv");

    assert_null(data_config_add_domain(&cfg, "web", err, sizeof err));
    assert_contains(err, "already configured");
    assert_null(data_config_add_domain(&cfg, "bad name", err, sizeof err));
    assert_int_equal(data_config_validate(&cfg, err, sizeof err), -1);
    assert_contains(err, "[domain web]");
    for (int i = 1; i < DATA_MAX_DOMAINS; i++) {
        char name[16];
        snprintf(name, sizeof name, "d%d", i);
        assert_non_null(data_config_add_domain(&cfg, name, err, sizeof err));
    }
    assert_null(data_config_add_domain(&cfg, "one_too_many", err, sizeof err));
    assert_contains(err, "more than 16 domains");
}

static void test_config_default_domains(void **state) {
    (void)state;
    DataConfig cfg;
    data_config_defaults(&cfg);
    data_config_use_default(&cfg);
    assert_int_equal(cfg.n_domains, 3);
    assert_string_equal(cfg.domains[0].name, "fortunes");
    assert_string_equal(cfg.domains[1].name, "bible");
    assert_string_equal(cfg.domains[2].train, "data/default/python/train.txt");
    assert_string_equal(cfg.domains[2].val, "data/default/python/val.txt");
    char err[256];
    assert_int_equal(data_config_validate(&cfg, err, sizeof err), 0);
    // A configured domain replaces the default set.
    data_config_defaults(&cfg);
    add_domain(&cfg, "mine", DATA_TEXT, "a", "b", 1);
    data_config_use_default(&cfg);
    assert_int_equal(cfg.n_domains, 1);
}

static void test_tokenizer_round_trip(void **state) {
    (void)state;
    const unsigned char text[] = {'h', 'i', 0, 200, 255, '\n'};
    int32_t ids[6];
    char back[7];
    tokenizer_encode_bytes(text, 6, ids);
    assert_int_equal(ids[3], 200);
    tokenizer_decode_bytes(ids, 6, back);
    assert_memory_equal(back, text, 6);
    int32_t odd[3] = {300, -1, 'x'};
    tokenizer_decode_bytes(odd, 3, back);
    assert_memory_equal(back, "??x", 3);
}

// ---- sources -----------------------------------------------------------------------

static void test_text_directory_sorted(void **state) {
    char dir[512], err[512];
    snprintf(dir, sizeof dir, "%s", fixture_path(state, "corpus"));
    assert_int_equal(mkdir(dir, 0755), 0);
    assert_int_equal(mkdir(fixture_path(state, "corpus/sub"), 0755), 0);
    // Written out of order; strcmp order is A0 < a.txt < b.txt < sub/c.txt.
    write_text(state, "corpus/sub/c.txt", "C");
    write_text(state, "corpus/b.txt", "B");
    write_text(state, "corpus/.hidden", "H");
    write_text(state, "corpus/a.txt", "A");
    write_text(state, "corpus/A0", "Z");
    TokenStream s;
    assert_int_equal(load_one(DATA_TEXT, dir, "", &s, err, sizeof err), 0);
    assert_stream_text(&s, "ZABC");
    token_stream_free(&s);

    char pattern[600];
    snprintf(pattern, sizeof pattern, "%s/*.txt", dir);
    assert_int_equal(load_one(DATA_TEXT, pattern, "", &s, err, sizeof err), 0);
    assert_stream_text(&s, "AB");
    token_stream_free(&s);

    snprintf(pattern, sizeof pattern, "%s/*.none", dir);
    assert_int_equal(load_one(DATA_TEXT, pattern, "", &s, err, sizeof err), -1);
    assert_contains(err, "no file matches");
    assert_int_equal(load_one(DATA_TEXT, fixture_path(state, "absent.txt"), "", &s, err,
                              sizeof err),
                     -1);
    assert_contains(err, "absent.txt: No such file or directory");
    token_stream_free(&s);
}

static void test_csv_edge_cases(void **state) {
    char err[512];
    write_text(state, "a.csv",
               "id,text,other\r\n"
               "1,\"hello, world\",x\r\n"
               "2,\"she said \"\"hi\"\"\",y\r\n"
               "3,\"line one\r\nline two\",z\r\n"
               "4,  spaced  ,w\r\n"
               "5,,v\r\n");
    TokenStream s;
    assert_int_equal(load_one(DATA_CSV, fixture_path(state, "a.csv"), "text", &s, err,
                              sizeof err),
                     0);
    assert_stream_text(&s, "hello, world\nshe said \"hi\"\nline one\r\nline two\n  spaced  \n\n");
    token_stream_free(&s);

    write_text(state, "bom.csv", "\xEF\xBB\xBFtext\nabc\n");
    assert_int_equal(load_one(DATA_CSV, fixture_path(state, "bom.csv"), "text", &s, err,
                              sizeof err),
                     0);
    assert_stream_text(&s, "abc\n");
    token_stream_free(&s);

    assert_int_equal(load_one(DATA_CSV, fixture_path(state, "a.csv"), "body", &s, err,
                              sizeof err),
                     -1);
    assert_contains(err, "a.csv: no column 'body'");
    assert_contains(err, "'id', 'text', 'other'");
    token_stream_free(&s);

    // An empty first field reaches an empty stream as (NULL, 0) (tests/fuzz/csv/
    // crash-empty-first-field.csv: pointer arithmetic on NULL under UBSan).
    write_text(state, "empty_first.csv", "text,label\n,b\nc,d\n");
    assert_int_equal(load_one(DATA_CSV, fixture_path(state, "empty_first.csv"), "text", &s,
                              err, sizeof err),
                     0);
    assert_stream_text(&s, "\nc\n");
    token_stream_free(&s);

    write_text(state, "short.csv", "id,text\n1,ok\n2\n");
    assert_int_equal(load_one(DATA_CSV, fixture_path(state, "short.csv"), "text", &s, err,
                              sizeof err),
                     -1);
    assert_contains(err, "record 3 has 1 fields");
    token_stream_free(&s);

    write_text(state, "open.csv", "text\n\"never closed\n");
    assert_int_equal(load_one(DATA_CSV, fixture_path(state, "open.csv"), "text", &s, err,
                              sizeof err),
                     -1);
    assert_contains(err, "open.csv: CSV error");
    token_stream_free(&s);
}

static void test_shard_round_trip(void **state) {
    char err[512];
    const uint16_t tokens[] = {1, 2, 300, 65535, 0};
    write_shard(fixture_path(state, "ok.bin"), SHARD_MAGIC, 1, 5, tokens, 5, 0);
    TokenStream s;
    assert_int_equal(load_one(DATA_SHARDS, fixture_path(state, "ok.bin"), "", &s, err,
                              sizeof err),
                     0);
    assert_int_equal(s.n, 5);
    for (size_t i = 0; i < 5; i++) assert_int_equal(s.ids[i], tokens[i]);
    token_stream_free(&s);
}

// Loads the shard `name` and checks that the error names it and contains `message`.
static void assert_shard_error(void **state, const char *name, const char *message) {
    char err[512];
    TokenStream s;
    assert_int_equal(load_one(DATA_SHARDS, fixture_path(state, name), "", &s, err, sizeof err),
                     -1);
    assert_contains(err, name);
    assert_contains(err, message);
    token_stream_free(&s);
}

static void test_shard_validation(void **state) {
    const uint16_t tokens[] = {1, 2, 3, 4};
    write_shard(fixture_path(state, "magic.bin"), 12345, 1, 4, tokens, 4, 0);
    assert_shard_error(state, "magic.bin",
                       "bad magic 12345 (expected 20240520): not an llm.c token shard");
    write_shard(fixture_path(state, "version.bin"), SHARD_MAGIC, 2, 4, tokens, 4, 0);
    assert_shard_error(state, "version.bin", "unsupported version 2 (expected 1");
    write_shard(fixture_path(state, "short.bin"), SHARD_MAGIC, 1, 4, tokens, 3, 0);
    assert_shard_error(state, "short.bin",
                       "truncated: header says 4 tokens (1032 bytes) but the file has 1030");
    write_shard(fixture_path(state, "long.bin"), SHARD_MAGIC, 1, 4, tokens, 4, 3);
    assert_shard_error(state, "long.bin", "3 trailing bytes after the 4 tokens");
    write_text(state, "tiny.bin", "not a shard");
    assert_shard_error(state, "tiny.bin", "shorter than the 1024-byte header");
}

static void write_h5(hid_t f, const char *name, hid_t type, const void *data, int rank,
                     const hsize_t *dims, hid_t mem_type) {
    hid_t space = H5Screate_simple(rank, dims, NULL);
    hid_t ds = H5Dcreate2(f, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(ds >= 0);
    assert_true(H5Dwrite(ds, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
    H5Dclose(ds);
    H5Sclose(space);
}

static void test_hdf5_tokens(void **state) {
    char path[512], err[512];
    snprintf(path, sizeof path, "%s", fixture_path(state, "tok.h5"));
    const int16_t small[] = {5, 0, 255, 1000};
    const uint64_t big[] = {7, 65536, 1048575};   // load_one allows ids below 1 << 20
    const double floats[] = {1.5, 2.5};
    const int32_t grid[] = {1, 2, 3, 4};
    hsize_t n4 = 4, n3 = 3, n2 = 2, dims2[2] = {2, 2};
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(f >= 0);
    write_h5(f, "tokens", H5T_STD_I16LE, small, 1, &n4, H5T_NATIVE_INT16);
    write_h5(f, "wide", H5T_STD_U64BE, big, 1, &n3, H5T_NATIVE_UINT64);
    write_h5(f, "floats", H5T_IEEE_F64LE, floats, 1, &n2, H5T_NATIVE_DOUBLE);
    write_h5(f, "grid", H5T_STD_I32LE, grid, 2, dims2, H5T_NATIVE_INT32);
    H5Fclose(f);

    TokenStream s;
    assert_int_equal(load_one(DATA_HDF5, path, "tokens", &s, err, sizeof err), 0);
    assert_int_equal(s.n, 4);
    for (size_t i = 0; i < 4; i++) assert_int_equal(s.ids[i], small[i]);
    token_stream_free(&s);
    if (load_one(DATA_HDF5, path, "wide", &s, err, sizeof err) != 0) fail_msg("%s", err);
    assert_int_equal(s.n, 3);
    for (size_t i = 0; i < 3; i++) assert_int_equal(s.ids[i], (int32_t)big[i]);
    token_stream_free(&s);

    assert_int_equal(load_one(DATA_HDF5, path, "nope", &s, err, sizeof err), -1);
    assert_contains(err, "tok.h5: no dataset 'nope'");
    assert_int_equal(load_one(DATA_HDF5, path, "floats", &s, err, sizeof err), -1);
    assert_contains(err, "'floats' does not hold integers");
    assert_int_equal(load_one(DATA_HDF5, path, "grid", &s, err, sizeof err), -1);
    assert_contains(err, "'grid' has 2 dimensions, expected 1");
    write_text(state, "plain.h5", "not hdf5");
    assert_int_equal(load_one(DATA_HDF5, fixture_path(state, "plain.h5"), "tokens", &s, err,
                              sizeof err),
                     -1);
    assert_contains(err, "plain.h5: not an HDF5 file");
    token_stream_free(&s);
}

static void test_token_beyond_vocab(void **state) {
    char err[512];
    write_pattern(state, "train.txt", 100, 0, 100, 0);
    write_text(state, "val.txt", "abcdefghijklmnopqrstuvwxyz\xC8");   // byte 200 at 26
    DataConfig cfg;
    data_config_defaults(&cfg);
    char train[512];
    snprintf(train, sizeof train, "%s", fixture_path(state, "train.txt"));
    add_domain(&cfg, "web", DATA_TEXT, train, fixture_path(state, "val.txt"), 1);
    DataLoader *dl;
    assert_int_equal(data_loader_open(&dl, &cfg, 128, NULL, 2, 8, 1, err, sizeof err), -1);
    assert_null(dl);
    assert_contains(err, "domain web (val)");
    assert_contains(err, "val.txt: token id 200 at position 26 is outside the vocabulary "
                         "(model.vocab = 128)");

    const uint16_t tokens[] = {1, 256};
    write_shard(fixture_path(state, "s.bin"), SHARD_MAGIC, 1, 2, tokens, 2, 0);
    TokenStream s = {0};
    cfg.domains[0].kind = DATA_SHARDS;
    assert_int_equal(source_load(&cfg.domains[0], fixture_path(state, "s.bin"), 256, NULL, &s, err,
                                 sizeof err),
                     -1);
    assert_contains(err, "token id 256 at position 1");
    token_stream_free(&s);
}

// ---- loader ------------------------------------------------------------------------

#define B 8
#define T 16

// Two text domains: "low" with bytes 0..99, "high" with bytes 128..227, each byte one
// more (mod 100) than the one before, so every window reveals its domain and offset.
static DataLoader *open_two_domains(void **state, double w_low, double w_high, uint64_t seed) {
    write_pattern(state, "low.txt", 5000, 0, 100, 0);
    write_pattern(state, "high.txt", 3000, 128, 100, 0);
    write_pattern(state, "val.txt", 1000, 0, 100, 0);
    char low[512], high[512], val[512], err[512];
    snprintf(low, sizeof low, "%s", fixture_path(state, "low.txt"));
    snprintf(high, sizeof high, "%s", fixture_path(state, "high.txt"));
    snprintf(val, sizeof val, "%s", fixture_path(state, "val.txt"));
    DataConfig cfg;
    data_config_defaults(&cfg);
    add_domain(&cfg, "low", DATA_TEXT, low, val, w_low);
    add_domain(&cfg, "high", DATA_TEXT, high, val, w_high);
    DataLoader *dl;
    if (data_loader_open(&dl, &cfg, 256, NULL, B, T, seed, err, sizeof err) != 0)
        fail_msg("data_loader_open: %s", err);
    return dl;
}

typedef struct {
    int32_t tokens[B * T], targets[B * T], domain[B];
} Batch;

static void next_batch(DataLoader *dl, Batch *b) {
    data_loader_next(dl, b->tokens, b->targets, b->domain);
}

static void test_batches_deterministic_per_seed(void **state) {
    DataLoader *a = open_two_domains(state, 1, 1, 42);
    DataLoader *same = open_two_domains(state, 1, 1, 42);
    DataLoader *other = open_two_domains(state, 1, 1, 43);
    assert_int_equal(data_loader_domains(a), 2);
    assert_string_equal(data_loader_domain_name(a, 1), "high");
    assert_int_equal(data_loader_train_tokens(a, 0), 5000);
    Batch ba[5], bs, bo;
    int differs = 0;
    for (int k = 0; k < 5; k++) {
        next_batch(a, &ba[k]);
        next_batch(same, &bs);
        next_batch(other, &bo);
        assert_memory_equal(&ba[k], &bs, sizeof bs);
        differs |= memcmp(&ba[k], &bo, sizeof bo) != 0;
    }
    assert_true(differs);
    assert_false(memcmp(&ba[0], &ba[1], sizeof ba[0]) == 0);
    assert_int_equal(data_loader_cursor(a), 5);

    // Seeking to k makes the next batch the (k+1)-th of a fresh loader, either direction.
    data_loader_seek(same, 3);
    next_batch(same, &bs);
    assert_memory_equal(&bs, &ba[3], sizeof bs);
    assert_int_equal(data_loader_cursor(same), 4);
    data_loader_seek(a, 1);
    next_batch(a, &bs);
    assert_memory_equal(&bs, &ba[1], sizeof bs);
    data_loader_close(a);
    data_loader_close(same);
    data_loader_close(other);
}

static void test_targets_shift_tokens(void **state) {
    DataLoader *dl = open_two_domains(state, 1, 1, 7);
    Batch b;
    for (int k = 0; k < 20; k++) {
        next_batch(dl, &b);
        for (size_t r = 0; r < B; r++) {
            int base = b.domain[r] ? 128 : 0;
            for (size_t t = 0; t < T; t++) {
                int32_t tok = b.tokens[r * T + t], next = (tok - base + 1) % 100 + base;
                assert_true(tok >= base && tok < base + 100);   // from the row's domain
                assert_int_equal(b.targets[r * T + t], next);
                if (t + 1 < T) assert_int_equal(b.tokens[r * T + t + 1], next);
            }
        }
    }
    data_loader_close(dl);
}

static void test_mixing_follows_weights(void **state) {
    DataLoader *dl = open_two_domains(state, 3, 1, 11);
    Batch b;
    size_t rows = 0, low = 0, starts_seen[100] = {0};
    for (int k = 0; k < 250; k++) {   // 2000 rows
        next_batch(dl, &b);
        for (size_t r = 0; r < B; r++, rows++) {
            low += b.domain[r] == 0;
            if (b.domain[r] == 0) starts_seen[b.tokens[r * T]]++;
        }
    }
    double frac = (double)low / (double)rows;
    if (frac < 0.72 || frac > 0.78) fail_msg("low domain drew %.3f of rows, expected 0.75", frac);
    // Windows start uniformly: every one of the 100 residues shows up.
    for (int i = 0; i < 100; i++) assert_true(starts_seen[i] > 0);
    data_loader_close(dl);
}

// Weight 0: a validation-only domain, never drawn for training; all zero is an error.
static void test_zero_weight_domain_is_never_drawn(void **state) {
    DataLoader *dl = open_two_domains(state, 1, 0, 5);
    Batch b;
    for (int k = 0; k < 250; k++) {
        next_batch(dl, &b);
        for (size_t r = 0; r < B; r++) assert_int_equal(b.domain[r], 0);
    }
    data_loader_close(dl);
    dl = open_two_domains(state, 0, 1, 5);
    next_batch(dl, &b);
    for (size_t r = 0; r < B; r++) assert_int_equal(b.domain[r], 1);
    data_loader_close(dl);
}

static void test_val_batches(void **state) {
    DataLoader *dl = open_two_domains(state, 1, 1, 1);
    // val: 1000 tokens, default val_tokens 65536: (1000 - 1) / 16 = 62 windows, 8 batches.
    assert_int_equal(data_loader_val_batches(dl, 0), 8);
    data_loader_close(dl);

    char val[512], err[512];
    snprintf(val, sizeof val, "%s", fixture_path(state, "val.txt"));
    DataConfig cfg;
    data_config_defaults(&cfg);
    cfg.val_tokens = 500;   // (500 - 1) / 16 = 31 windows: 3 full batches and one of 7
    add_domain(&cfg, "low", DATA_TEXT, fixture_path(state, "low.txt"), val, 1);
    assert_int_equal(data_loader_open(&dl, &cfg, 256, NULL, B, T, 1, err, sizeof err), 0);
    size_t batches = data_loader_val_batches(dl, 0), total = 0;
    assert_int_equal(batches, 4);
    Batch b;
    for (size_t i = 0; i < batches; i++) {
        size_t rows = data_loader_val_batch(dl, 0, i, b.tokens, b.targets);
        assert_int_equal(rows, i + 1 < batches ? B : 7);
        for (size_t r = 0; r < rows; r++) {
            size_t window = total + r;   // starts at token window * T of the val stream
            for (size_t t = 0; t < T; t++) {
                assert_int_equal(b.tokens[r * T + t], (int32_t)((window * T + t) % 100));
                assert_int_equal(b.targets[r * T + t], (int32_t)((window * T + t + 1) % 100));
            }
        }
        total += rows;
    }
    assert_int_equal(total, 31);
    assert_true(total * T + 1 <= 500);   // within val_tokens
    data_loader_close(dl);

    cfg.val_tokens = T;   // less than one window
    assert_int_equal(data_loader_open(&dl, &cfg, 256, NULL, B, T, 1, err, sizeof err), -1);
    assert_contains(err, "data.val_tokens = 16");
}

static void test_short_stream_is_an_error(void **state) {
    char err[512], val[512];
    write_text(state, "tiny.txt", "0123456789");
    write_pattern(state, "val.txt", 1000, 0, 100, 0);
    snprintf(val, sizeof val, "%s", fixture_path(state, "val.txt"));
    DataConfig cfg;
    data_config_defaults(&cfg);
    add_domain(&cfg, "tiny", DATA_TEXT, fixture_path(state, "tiny.txt"), val, 1);
    DataLoader *dl;
    assert_int_equal(data_loader_open(&dl, &cfg, 256, NULL, B, T, 1, err, sizeof err), -1);
    assert_contains(err, "domain tiny: train stream");
    assert_contains(err, "holds 10 tokens, fewer than one window of seq_len + 1 = 17");
}

// ---- default corpus manifest -------------------------------------------------------

static void write_manifest_file(void **state, const char *name, const char *text,
                                FILE *manifest) {
    write_text(state, name, text);
    unsigned long crc = crc32_z(0, (const unsigned char *)text, strlen(text));
    fprintf(manifest, "x\tx\t%s\t%zu\t%08lx\tpkg=1\n", name, strlen(text), crc);
}

static void test_default_ready_checks_manifest(void **state) {
    const char *dir = *state;
    assert_int_equal(data_default_ready(dir), 0);   // no manifest
    static const char *const names[] = {"a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "f.txt"};
    char manifest[512];
    snprintf(manifest, sizeof manifest, "%s", fixture_path(state, PREPARE_MANIFEST_NAME));
    FILE *f = fopen(manifest, "w");
    fprintf(f, "%s\n%s\n", PREPARE_MANIFEST_FORMAT, PREPARE_MANIFEST_HEADER);
    for (int i = 0; i < 6; i++) write_manifest_file(state, names[i], names[i], f);
    fclose(f);
    assert_int_equal(data_default_ready(dir), 1);
    write_text(state, "c.txt", "c.tx!");   // same size, different bytes
    assert_int_equal(data_default_ready(dir), 0);
    write_text(state, "c.txt", "c.txt");
    assert_int_equal(data_default_ready(dir), 1);
    assert_int_equal(unlink(fixture_path(state, "f.txt")), 0);
    assert_int_equal(data_default_ready(dir), 0);
}

static const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_config_keys),
    cmocka_unit_test(test_config_default_domains),
    cmocka_unit_test(test_tokenizer_round_trip),
    FIXTURE_TEST(test_text_directory_sorted),
    FIXTURE_TEST(test_csv_edge_cases),
    FIXTURE_TEST(test_shard_round_trip),
    FIXTURE_TEST(test_shard_validation),
    FIXTURE_TEST(test_hdf5_tokens),
    FIXTURE_TEST(test_token_beyond_vocab),
    FIXTURE_TEST(test_batches_deterministic_per_seed),
    FIXTURE_TEST(test_targets_shift_tokens),
    FIXTURE_TEST(test_mixing_follows_weights),
    FIXTURE_TEST(test_zero_weight_domain_is_never_drawn),
    FIXTURE_TEST(test_val_batches),
    FIXTURE_TEST(test_short_stream_is_an_error),
    FIXTURE_TEST(test_default_ready_checks_manifest),
};

TEST_MAIN(tests)
