#include "bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uninorm.h>

#include "../base/util.h"

#define BPE_MAX_REGEX 4
// Pieces longer than this are not cached (long whitespace or digit runs are rare), and
// merge through a heap: the scan for the lowest pair is quadratic in a piece's length.
#define BPE_CACHE_PIECE 64
#define BPE_CACHE_ENTRIES (1u << 18)
// What ByteLevel's pre-tokenizer splits with when use_regex is true (GPT-2's pattern).
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char replacement_char[] = "\xEF\xBF\xBD";

// ---- a byte-string -> int32 hash map (open addressing, FNV-1a) -------------------------

typedef struct {
    uint64_t hash;   // 0: empty slot
    uint32_t off, len;
    int32_t val;
} MapSlot;

typedef struct {
    MapSlot *slots;   // (cap), cap a power of two
    size_t cap, used;
    char *keys;       // (keys_len) every key, back to back
    size_t keys_len, keys_cap;
} StrMap;

static uint64_t map_hash(const void *key, size_t len) {
    const unsigned char *p = key;
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h ? h : 1;
}

static MapSlot *map_slot(const StrMap *m, const void *key, size_t len, uint64_t h) {
    for (size_t i = h & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        MapSlot *s = &m->slots[i];
        if (!s->hash || (s->hash == h && s->len == len && !memcmp(m->keys + s->off, key, len)))
            return s;
    }
}

static const int32_t *map_get(const StrMap *m, const void *key, size_t len) {
    if (!m->cap) return NULL;
    MapSlot *s = map_slot(m, key, len, map_hash(key, len));
    return s->hash ? &s->val : NULL;
}

static void map_grow(StrMap *m) {
    StrMap g = *m;
    g.cap = m->cap ? 2 * m->cap : 1024;
    g.slots = CALLOC(g.cap, sizeof *g.slots);
    for (size_t i = 0; i < m->cap; i++)
        if (m->slots[i].hash) *map_slot(&g, m->keys + m->slots[i].off, m->slots[i].len,
                                        m->slots[i].hash) = m->slots[i];
    free(m->slots);
    *m = g;
}

static void map_put(StrMap *m, const void *key, size_t len, int32_t val) {
    if (2 * (m->used + 1) > m->cap) map_grow(m);
    uint64_t h = map_hash(key, len);
    MapSlot *s = map_slot(m, key, len, h);
    if (s->hash) {
        s->val = val;
        return;
    }
    if (!m->keys || m->keys_len + len > m->keys_cap) {   // an empty first key still needs a buffer
        m->keys_cap = 2 * (m->keys_len + len) + 4096;
        m->keys = realloc(m->keys, m->keys_cap);
        CHECK(m->keys, "out of memory growing a tokenizer table");
    }
    memcpy(m->keys + m->keys_len, key, len);
    *s = (MapSlot){h, (uint32_t)m->keys_len, (uint32_t)len, val};
    m->keys_len += len;
    m->used++;
}

static void map_free(StrMap *m) {
    free(m->slots);
    free(m->keys);
    *m = (StrMap){0};
}

// ---- the tokenizer ---------------------------------------------------------------------

typedef struct {
    char *text;
    size_t len;
    int32_t id;
} AddedToken;

struct Bpe {
    StrMap vocab;             // byte-level token string -> id
    StrMap merges;            // (left id, right id) as 8 bytes -> rank
    int32_t *merged;          // (n_merges) the id a merge makes
    char **tokens;            // (n_tokens) id -> its string; NULL where no token has the id
    int n_tokens;
    int32_t byte_id[256];     // byte -> the id of its byte-level symbol
    char byte_sym[256][3];    // byte -> its byte-level symbol (UTF-8, NUL-terminated)
    int16_t sym_byte[512];    // byte-level code point -> byte, -1 for others
    AddedToken *added;        // (n_added)
    size_t n_added;
    unsigned char added_first[256];   // some added token starts with this byte
    int nfc, add_prefix_space, ignore_merges;
    pcre2_code *re[BPE_MAX_REGEX];
    pcre2_match_data *md[BPE_MAX_REGEX];
    int n_re;
    StrMap cache;             // piece -> offset of (count, ids...) in cache_ids
    int32_t *cache_ids;
    size_t cache_n, cache_cap;
    int32_t *sym, *rank;      // (sym_cap) scratch of one piece's merges
    size_t sym_cap;
};

// GPT-2's byte -> code point table: printable Latin-1 bytes stand for themselves, the
// others (controls, space, 0x7f-0xa0, 0xad) for 256, 257, ... in byte order.
static void init_byte_map(Bpe *b) {
    int next = 256;
    for (int i = 0; i < 512; i++) b->sym_byte[i] = -1;
    for (int c = 0; c < 256; c++) {
        int keep = (c >= '!' && c <= '~') || (c >= 0xa1 && c <= 0xac) || (c >= 0xae);
        int cp = keep ? c : next++;
        b->sym_byte[cp] = (int16_t)c;
        if (cp < 0x80) {
            b->byte_sym[c][0] = (char)cp;
            b->byte_sym[c][1] = 0;
        } else {
            b->byte_sym[c][0] = (char)(0xc0 | (cp >> 6));
            b->byte_sym[c][1] = (char)(0x80 | (cp & 0x3f));
            b->byte_sym[c][2] = 0;
        }
    }
}

typedef struct {
    const char *path;
    char *err;
    size_t n;
} LoadCtx;

static int refuse(const LoadCtx *c, const char *fmt, const char *a, const char *b) {
    char what[512];
    snprintf(what, sizeof what, fmt, a, b);
    snprintf(c->err, c->n, "%s: %s", c->path, what);
    return -1;
}

static const char *type_of(const cJSON *j) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "type");
    return cJSON_IsString(t) ? t->valuestring : "(no type)";
}

static int bool_key(const cJSON *j, const char *key, int dflt) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : dflt;
}

static int add_regex(Bpe *b, const LoadCtx *c, const char *pattern, const char *key) {
    if (b->n_re == BPE_MAX_REGEX) return refuse(c, "%s: more than 4 splitting regexes%s", key, "");
    int code;
    PCRE2_SIZE at;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &code, &at,
                                   NULL);
    if (!re) {
        char msg[256];
        pcre2_get_error_message(code, (PCRE2_UCHAR *)msg, sizeof msg);
        return refuse(c, "%s: PCRE2 cannot compile the regex: %s", key, msg);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);   // falls back to the interpreter
    b->re[b->n_re] = re;
    b->md[b->n_re++] = pcre2_match_data_create_from_pattern(re, NULL);
    return 0;
}

static int load_byte_level(Bpe *b, const LoadCtx *c, const cJSON *p, const char *key) {
    b->add_prefix_space = bool_key(p, "add_prefix_space", 0);
    return bool_key(p, "use_regex", 1) ? add_regex(b, c, gpt2_pattern, key) : 0;
}

static int load_split(Bpe *b, const LoadCtx *c, const cJSON *p) {
    const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
    const cJSON *re = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
    const cJSON *beh = cJSON_GetObjectItemCaseSensitive(p, "behavior");
    if (!cJSON_IsString(re))
        return refuse(c, "pre_tokenizer Split: pattern must be {\"Regex\": ...}%s%s", "", "");
    if (!cJSON_IsString(beh) || strcmp(beh->valuestring, "Isolated"))
        return refuse(c, "pre_tokenizer Split: behavior = %s is not supported (Isolated is)%s",
                      cJSON_IsString(beh) ? beh->valuestring : "(none)", "");
    if (bool_key(p, "invert", 0))
        return refuse(c, "pre_tokenizer Split: invert = true is not supported%s%s", "", "");
    return add_regex(b, c, re->valuestring, "pre_tokenizer Split");
}

static int load_pre_tokenizer(Bpe *b, const LoadCtx *c, const cJSON *root) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    if (!strcmp(type_of(p), "ByteLevel")) return load_byte_level(b, c, p, "pre_tokenizer");
    if (strcmp(type_of(p), "Sequence"))
        return refuse(c, "pre_tokenizer type = %s is not supported (ByteLevel, or a Sequence "
                         "of Split then ByteLevel)%s", type_of(p), "");
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers");
    int n = cJSON_GetArraySize(list), i = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, list) {
        const char *t = type_of(e);
        int last = ++i == n;
        if (!last && !strcmp(t, "Split")) {
            if (load_split(b, c, e) != 0) return -1;
        } else if (last && !strcmp(t, "ByteLevel")) {
            if (load_byte_level(b, c, e, "pre_tokenizer ByteLevel") != 0) return -1;
        } else
            return refuse(c, "pre_tokenizer Sequence: type = %s is not supported here (Split "
                             "pre-tokenizers, then one ByteLevel last)%s", t, "");
    }
    return n ? 0 : refuse(c, "pre_tokenizer Sequence is empty (ByteLevel is needed)%s%s", "", "");
}

static int check_model_keys(const LoadCtx *c, const cJSON *model) {
    if (strcmp(type_of(model), "BPE"))
        return refuse(c, "model type = %s is not supported (BPE is)%s", type_of(model), "");
    if (bool_key(model, "byte_fallback", 0))
        return refuse(c, "model byte_fallback = true is not supported (byte-level BPE needs "
                         "none)%s%s", "", "");
    static const char *const empty[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(model, empty[i]);
        if (cJSON_IsString(v) && v->valuestring[0])
            return refuse(c, "model %s = '%s' is not supported (null is)", empty[i],
                          v->valuestring);
    }
    return 0;
}

static void set_token(Bpe *b, int id, const char *s) {
    free(b->tokens[id]);
    b->tokens[id] = strdup(s);
    CHECK(b->tokens[id], "out of memory loading a tokenizer");
}

static int largest_id(const cJSON *vocab, const cJSON *added) {
    int top = -1;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) if (e->valueint > top) top = e->valueint;
    cJSON_ArrayForEach(e, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (cJSON_IsNumber(id) && id->valueint > top) top = id->valueint;
    }
    return top;
}

static int load_vocab(Bpe *b, const LoadCtx *c, const cJSON *vocab, const cJSON *added) {
    if (!cJSON_IsObject(vocab)) return refuse(c, "model vocab is not an object%s%s", "", "");
    int top = largest_id(vocab, added);
    if (top < 0 || top >= (1 << 24))
        return refuse(c, "model vocab: ids must lie in [0, 2^24)%s%s", "", "");
    b->n_tokens = top + 1;
    b->tokens = CALLOC((size_t)b->n_tokens, sizeof *b->tokens);
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valueint < 0)
            return refuse(c, "model vocab['%s'] is not a token id%s", e->string, "");
        map_put(&b->vocab, e->string, strlen(e->string), e->valueint);
        set_token(b, e->valueint, e->string);
    }
    for (int i = 0; i < 256; i++) {
        const int32_t *id = map_get(&b->vocab, b->byte_sym[i], strlen(b->byte_sym[i]));
        char hex[8];
        snprintf(hex, sizeof hex, "0x%02x", i);
        if (!id) return refuse(c, "model vocab lacks the byte-level symbol '%s' of byte %s",
                               b->byte_sym[i], hex);
        b->byte_id[i] = *id;
    }
    return 0;
}

// "a b" or ["a", "b"] -> a and b (pointers into the JSON or into buf).
static int merge_pair(const cJSON *m, char *buf, size_t n, const char **a, const char **b) {
    if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 &&
        cJSON_IsString(cJSON_GetArrayItem(m, 0)) && cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
        *a = cJSON_GetArrayItem(m, 0)->valuestring;
        *b = cJSON_GetArrayItem(m, 1)->valuestring;
        return 0;
    }
    if (!cJSON_IsString(m) || strlen(m->valuestring) >= n) return -1;
    snprintf(buf, n, "%s", m->valuestring);
    char *space = strchr(buf, ' ');
    if (!space || strchr(space + 1, ' ')) return -1;
    *space = 0;
    *a = buf;
    *b = space + 1;
    return 0;
}

static int load_merges(Bpe *b, const LoadCtx *c, const cJSON *merges) {
    if (!cJSON_IsArray(merges)) return refuse(c, "model merges is not an array%s%s", "", "");
    size_t count = (size_t)cJSON_GetArraySize(merges), rank = 0;
    b->merged = CALLOC(count ? count : 1, sizeof *b->merged);
    char buf[1024], joined[2048], which[32];
    const cJSON *m;
    cJSON_ArrayForEach(m, merges) {
        const char *l, *r;
        snprintf(which, sizeof which, "%zu", rank);
        if (merge_pair(m, buf, sizeof buf, &l, &r) != 0)
            return refuse(c, "model merges[%s] is not \"a b\" nor [\"a\", \"b\"]%s", which, "");
        snprintf(joined, sizeof joined, "%s%s", l, r);
        const int32_t *il = map_get(&b->vocab, l, strlen(l)), *ir = map_get(&b->vocab, r, strlen(r));
        const int32_t *im = map_get(&b->vocab, joined, strlen(joined));
        if (!il || !ir || !im)
            return refuse(c, "model merges[%s]: '%s' is not in model vocab", which,
                          !il ? l : !ir ? r : joined);
        int32_t key[2] = {*il, *ir};
        map_put(&b->merges, key, sizeof key, (int32_t)rank);
        b->merged[rank++] = *im;
    }
    return 0;
}

static int load_added(Bpe *b, const LoadCtx *c, const cJSON *added) {
    size_t count = (size_t)cJSON_GetArraySize(added);
    b->added = CALLOC(count ? count : 1, sizeof *b->added);
    static const char *const refused[] = {"single_word", "lstrip", "rstrip"};
    const cJSON *e;
    cJSON_ArrayForEach(e, added) {
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (!cJSON_IsString(content) || !content->valuestring[0] || !cJSON_IsNumber(id))
            return refuse(c, "added_tokens: an entry lacks its content or id%s%s", "", "");
        for (int i = 0; i < 3; i++)
            if (bool_key(e, refused[i], 0))
                return refuse(c, "added_tokens '%s': %s = true is not supported",
                              content->valuestring, refused[i]);
        AddedToken *t = &b->added[b->n_added++];
        t->text = strdup(content->valuestring);
        CHECK(t->text, "out of memory loading a tokenizer");
        t->len = strlen(t->text);
        t->id = id->valueint;
        b->added_first[(unsigned char)t->text[0]] = 1;
        set_token(b, t->id, t->text);
    }
    return 0;
}

static int load_root(Bpe *b, const LoadCtx *c, const cJSON *root) {
    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (norm && !cJSON_IsNull(norm)) {
        if (strcmp(type_of(norm), "NFC"))
            return refuse(c, "normalizer type = %s is not supported (null or NFC)%s",
                          type_of(norm), "");
        b->nfc = 1;
    }
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (dec && !cJSON_IsNull(dec) && strcmp(type_of(dec), "ByteLevel"))
        return refuse(c, "decoder type = %s is not supported (ByteLevel)%s", type_of(dec), "");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (added && !cJSON_IsNull(added) && !cJSON_IsArray(added))
        return refuse(c, "added_tokens is not an array%s%s", "", "");
    if (check_model_keys(c, model) != 0 || load_pre_tokenizer(b, c, root) != 0 ||
        load_vocab(b, c, cJSON_GetObjectItemCaseSensitive(model, "vocab"), added) != 0 ||
        load_merges(b, c, cJSON_GetObjectItemCaseSensitive(model, "merges")) != 0 ||
        load_added(b, c, added) != 0)
        return -1;
    b->ignore_merges = bool_key(model, "ignore_merges", 0);
    return 0;
}

static char *read_whole(const char *path, size_t *len, char *err, size_t n) {
    FILE *f = fopen(path, "rb");
    if (!f) return snprintf(err, n, "%s: %s", path, strerror(errno)), NULL;
    size_t cap = 1 << 16, got = 0, r;
    char *buf = CALLOC(cap + 1, 1);
    while ((r = fread(buf + got, 1, cap - got, f)) > 0) {
        got += r;
        if (got == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
            CHECK(buf, "out of memory reading %s", path);
        }
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        free(buf);
        return snprintf(err, n, "%s: read error", path), NULL;
    }
    buf[got] = 0;
    *len = got;
    return buf;
}

Bpe *bpe_open(const char *path, char *err, size_t n) {
    size_t len;
    char *text = read_whole(path, &len, err, n);
    if (!text) return NULL;
    cJSON *root = cJSON_ParseWithLength(text, len);
    free(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return snprintf(err, n, "%s: not a tokenizer.json (no JSON object)", path), NULL;
    }
    Bpe *b = CALLOC(1, sizeof *b);
    init_byte_map(b);
    LoadCtx c = {path, err, n};
    int rc = load_root(b, &c, root);
    cJSON_Delete(root);
    if (rc != 0) {
        bpe_free(b);
        return NULL;
    }
    return b;
}

void bpe_free(Bpe *b) {
    if (!b) return;
    map_free(&b->vocab);
    map_free(&b->merges);
    map_free(&b->cache);
    for (int i = 0; i < b->n_tokens; i++) free(b->tokens[i]);
    for (size_t i = 0; i < b->n_added; i++) free(b->added[i].text);
    for (int i = 0; i < b->n_re; i++) {
        pcre2_match_data_free(b->md[i]);
        pcre2_code_free(b->re[i]);
    }
    free(b->tokens);
    free(b->added);
    free(b->merged);
    free(b->cache_ids);
    free(b->sym);
    free(b->rank);
    free(b);
}

int bpe_vocab(const Bpe *b) { return b->n_tokens; }

// ---- encoding --------------------------------------------------------------------------

typedef struct {
    int32_t **ids;
    size_t *n, *cap;
} IdOut;

static void out_push(IdOut *o, const int32_t *ids, size_t k) {
    if (*o->n + k > *o->cap) {
        size_t cap = 2 * *o->cap > *o->n + k ? 2 * *o->cap : *o->n + k + 1024;
        int32_t *g = realloc(*o->ids, cap * sizeof *g);
        CHECK(g, "out of memory growing a token stream to %zu ids", cap);
        *o->ids = g;
        *o->cap = cap;
    }
    memcpy(*o->ids + *o->n, ids, k * sizeof *ids);
    *o->n += k;
}

static int32_t pair_rank(const Bpe *b, int32_t l, int32_t r) {
    int32_t key[2] = {l, r};
    const int32_t *rank = map_get(&b->merges, key, sizeof key);
    return rank ? *rank : INT32_MAX;
}

// sym (n) <- the lowest-ranked adjacent pair merged, leftmost first, until none merges.
static size_t merge_symbols(const Bpe *b, int32_t *sym, int32_t *rank, size_t n) {
    for (size_t i = 0; i + 1 < n; i++) rank[i] = pair_rank(b, sym[i], sym[i + 1]);
    while (n > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < n; i++)
            if (rank[i] < rank[best]) best = i;
        if (rank[best] == INT32_MAX) break;
        sym[best] = b->merged[rank[best]];
        memmove(sym + best + 1, sym + best + 2, (n - best - 2) * sizeof *sym);
        memmove(rank + best + 1, rank + best + 2, (n - best - 2) * sizeof *rank);
        n--;
        if (best > 0) rank[best - 1] = pair_rank(b, sym[best - 1], sym[best]);
        if (best + 1 < n) rank[best] = pair_rank(b, sym[best], sym[best + 1]);
    }
    return n;
}

// A candidate merge of the symbol at pos with the next one, ordered by rank, then pos.
typedef struct {
    int32_t rank;
    uint32_t pos;
} HeapItem;

static int heap_less(HeapItem a, HeapItem b) {
    return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos);
}

static void heap_push(HeapItem *h, size_t *n, HeapItem it) {
    size_t i = (*n)++;
    for (; i > 0 && heap_less(it, h[(i - 1) / 2]); i = (i - 1) / 2) h[i] = h[(i - 1) / 2];
    h[i] = it;
}

static HeapItem heap_pop(HeapItem *h, size_t *n) {
    HeapItem top = h[0], last = h[--*n];
    size_t i = 0;
    for (size_t c; (c = 2 * i + 1) < *n; i = c) {
        if (c + 1 < *n && heap_less(h[c + 1], h[c])) c++;
        if (!heap_less(h[c], last)) break;
        h[i] = h[c];
    }
    h[i] = last;
    return top;
}

// merge_symbols for long pieces, in O(n log n): the same order (lowest rank, leftmost),
// over a linked list of symbols with a heap of candidate merges; stale candidates (a
// side already merged away, or the pair changed) are skipped when they come up.
static size_t merge_symbols_heap(const Bpe *b, int32_t *sym, size_t n) {
    int32_t *next = CALLOC(n, sizeof *next), *prev = CALLOC(n, sizeof *prev);
    unsigned char *dead = CALLOC(n, 1);
    HeapItem *heap = CALLOC(3 * n + 1, sizeof *heap);   // n - 1 pairs, then 2 per merge
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
        prev[i] = (int32_t)i - 1;
        int32_t r = i + 1 < n ? pair_rank(b, sym[i], sym[i + 1]) : INT32_MAX;
        if (r != INT32_MAX) heap_push(heap, &hn, (HeapItem){r, (uint32_t)i});
    }
    while (hn) {
        HeapItem it = heap_pop(heap, &hn);
        int32_t p = (int32_t)it.pos, q = next[p];
        if (dead[p] || q < 0 || pair_rank(b, sym[p], sym[q]) != it.rank) continue;
        sym[p] = b->merged[it.rank];
        dead[q] = 1;
        next[p] = next[q];
        if (next[q] >= 0) prev[next[q]] = p;
        int32_t r;
        if (prev[p] >= 0 && (r = pair_rank(b, sym[prev[p]], sym[p])) != INT32_MAX)
            heap_push(heap, &hn, (HeapItem){r, (uint32_t)prev[p]});
        if (next[p] >= 0 && (r = pair_rank(b, sym[p], sym[next[p]])) != INT32_MAX)
            heap_push(heap, &hn, (HeapItem){r, (uint32_t)p});
    }
    size_t k = 0;
    for (int32_t i = 0; i >= 0; i = next[i]) sym[k++] = sym[i];
    free(heap);
    free(dead);
    free(prev);
    free(next);
    return k;
}

// The whole piece as one token (model.ignore_merges), or -1.
static int32_t whole_piece(const Bpe *b, const unsigned char *s, size_t len) {
    char *buf = CALLOC(2 * len + 1, 1);
    size_t o = 0;
    for (size_t i = 0; i < len; i++)
        for (const char *p = b->byte_sym[s[i]]; *p; p++) buf[o++] = *p;
    const int32_t *id = map_get(&b->vocab, buf, o);
    free(buf);
    return id ? *id : -1;
}

static void cache_store(Bpe *b, const char *s, size_t len, const int32_t *ids, size_t k) {
    if (len > BPE_CACHE_PIECE || b->cache.used >= BPE_CACHE_ENTRIES) return;
    if (b->cache_n + k + 1 > b->cache_cap) {
        b->cache_cap = 2 * (b->cache_n + k + 1) + 4096;
        b->cache_ids = realloc(b->cache_ids, b->cache_cap * sizeof *b->cache_ids);
        CHECK(b->cache_ids, "out of memory growing the tokenizer's cache");
    }
    map_put(&b->cache, s, len, (int32_t)b->cache_n);
    b->cache_ids[b->cache_n++] = (int32_t)k;
    memcpy(b->cache_ids + b->cache_n, ids, k * sizeof *ids);
    b->cache_n += k;
}

static void encode_piece(Bpe *b, const char *s, size_t len, IdOut *o) {
    if (!len) return;
    const int32_t *hit = len <= BPE_CACHE_PIECE ? map_get(&b->cache, s, len) : NULL;
    if (hit) {
        out_push(o, b->cache_ids + *hit + 1, (size_t)b->cache_ids[*hit]);
        return;
    }
    const unsigned char *u = (const unsigned char *)s;
    int32_t whole = b->ignore_merges ? whole_piece(b, u, len) : -1;
    if (whole >= 0) {
        out_push(o, &whole, 1);
        cache_store(b, s, len, &whole, 1);
        return;
    }
    if (len > b->sym_cap) {
        b->sym_cap = 2 * len;
        free(b->sym);
        free(b->rank);
        b->sym = CALLOC(b->sym_cap, sizeof *b->sym);
        b->rank = CALLOC(b->sym_cap, sizeof *b->rank);
    }
    for (size_t i = 0; i < len; i++) b->sym[i] = b->byte_id[u[i]];
    size_t k = len > BPE_CACHE_PIECE ? merge_symbols_heap(b, b->sym, len)
                                     : merge_symbols(b, b->sym, b->rank, len);
    out_push(o, b->sym, k);
    cache_store(b, s, len, b->sym, k);
}

static size_t utf8_next(const char *s, size_t len, size_t i) {
    for (i++; i < len && ((unsigned char)s[i] & 0xc0) == 0x80; i++) {}
    return i;
}

// Splits s (len) with regex `level` and its matches and the gaps between them (Isolated)
// with the next regex; after the last, each piece is a word for BPE.
static int split_level(Bpe *b, int level, const char *s, size_t len, IdOut *o, char *err,
                       size_t n) {
    if (level == b->n_re) {
        encode_piece(b, s, len, o);
        return 0;
    }
    size_t off = 0, last = 0;
    while (off < len) {
        int rc = pcre2_match(b->re[level], (PCRE2_SPTR)s, len, off, 0, b->md[level], NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            char msg[256];
            pcre2_get_error_message(rc, (PCRE2_UCHAR *)msg, sizeof msg);
            return snprintf(err, n, "pre-tokenizer regex: %s", msg), -1;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(b->md[level]);
        if (ov[1] == ov[0]) {   // an empty match splits nothing
            off = utf8_next(s, len, ov[0]);
            continue;
        }
        if (ov[0] > last && split_level(b, level + 1, s + last, ov[0] - last, o, err, n) != 0)
            return -1;
        if (split_level(b, level + 1, s + ov[0], ov[1] - ov[0], o, err, n) != 0) return -1;
        last = off = ov[1];
    }
    return last < len ? split_level(b, level + 1, s + last, len - last, o, err, n) : 0;
}

// Text between added tokens: normalised, a prefix space, then split and merged.
static int encode_segment(Bpe *b, const char *s, size_t len, IdOut *o, char *err, size_t n) {
    if (!len) return 0;
    char *norm = NULL;
    if (b->nfc) {
        size_t got = 0;
        norm = (char *)u8_normalize(UNINORM_NFC, (const uint8_t *)s, len, NULL, &got);
        if (!norm)
            return snprintf(err, n, "normalizer NFC: the text is not valid UTF-8 (%s)",
                            strerror(errno)), -1;
        s = norm;
        len = got;
    }
    char *spaced = NULL;
    if (b->add_prefix_space && len && s[0] != ' ') {
        spaced = CALLOC(len + 1, 1);
        spaced[0] = ' ';
        memcpy(spaced + 1, s, len);
        s = spaced;
        len++;
    }
    int rc = split_level(b, 0, s, len, o, err, n);
    free(spaced);
    free(norm);
    return rc;
}

// The longest added token at s (len bytes left), or NULL.
static const AddedToken *added_at(const Bpe *b, const char *s, size_t len) {
    const AddedToken *best = NULL;
    for (size_t i = 0; i < b->n_added; i++) {
        const AddedToken *t = &b->added[i];
        if (t->len <= len && (!best || t->len > best->len) && !memcmp(s, t->text, t->len))
            best = t;
    }
    return best;
}

int bpe_encode(Bpe *b, const char *text, size_t len, int32_t **ids, size_t *n_ids,
               size_t *cap, char *err, size_t n) {
    IdOut o = {ids, n_ids, cap};
    size_t seg = 0;
    for (size_t p = 0; p < len;) {
        const AddedToken *t =
            b->added_first[(unsigned char)text[p]] ? added_at(b, text + p, len - p) : NULL;
        if (!t) {
            p++;
            continue;
        }
        if (encode_segment(b, text + seg, p - seg, &o, err, n) != 0) return -1;
        out_push(&o, &t->id, 1);
        seg = p += t->len;
    }
    return encode_segment(b, text + seg, len - seg, &o, err, n);
}

// ---- decoding --------------------------------------------------------------------------

typedef struct {
    char *buf;
    size_t len, cap;
} Bytes;

static void bytes_push(Bytes *o, const void *p, size_t k) {
    if (o->len + k + 1 > o->cap) {
        o->cap = 2 * (o->len + k + 1) + 256;
        o->buf = realloc(o->buf, o->cap);
        CHECK(o->buf, "out of memory decoding tokens");
    }
    memcpy(o->buf + o->len, p, k);
    o->len += k;
    o->buf[o->len] = 0;
}

// A token's bytes: each byte-level symbol as its byte, or, as the ByteLevel decoder does,
// the token's own UTF-8 when any character of it is no byte-level symbol.
static void decode_token(const Bpe *b, const char *t, Bytes *o) {
    size_t start = o->len, len = strlen(t);
    for (size_t i = 0; i < len;) {
        const unsigned char *u = (const unsigned char *)t + i;
        int cp = -1, k = 1;
        if (u[0] < 0x80) cp = u[0];
        else if ((u[0] & 0xe0) == 0xc0 && i + 1 < len) cp = ((u[0] & 0x1f) << 6) | (u[1] & 0x3f), k = 2;
        if (cp < 0 || cp >= 512 || b->sym_byte[cp] < 0) {
            o->len = start;
            bytes_push(o, t, len);
            return;
        }
        char c = (char)b->sym_byte[cp];
        bytes_push(o, &c, 1);
        i += (size_t)k;
    }
}

char *bpe_decode(const Bpe *b, const int32_t *ids, size_t n, size_t *len) {
    Bytes o = {0};
    bytes_push(&o, "", 0);
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= b->n_tokens || !b->tokens[ids[i]])
            bytes_push(&o, replacement_char, 3);
        else
            decode_token(b, b->tokens[ids[i]], &o);
    }
    *len = o.len;
    return o.buf;
}
