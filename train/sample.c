// sample.c: batched generation through a KV cache (sample.h): the decode loop, the window,
// stop strings, EOS and the logits dump.
#include "sample.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/util.h"
#include "formats/h5io.h"

// One prompt's sequence: ids (len) are the prompt's then the generated ones; the cache
// holds ids[start .. start + cached).
typedef struct {
    int32_t *ids;
    size_t len, cap, prompt_len, start, cached;
    int generated, done;
    size_t stop_at;    // bytes of decoded text kept when a stop string ended it (SIZE_MAX: all)
    Rng rng;
    real *logits;      // (len - 1, V) with a dump: the logits after each id
} Seq;

// The decode model for B sequences and a cache of L positions, with m's weights. On the
// CPU wherever m lives, as moe sample and moe eval run (a GPU run's end-of-training
// sample decodes a copy; the CUDA decode op is checked by tests/cuda on a GPU only).
static void decoder_init(Model *d, const Model *m, size_t B, size_t L) {
    model_init_decode(d, &m->cfg, backend_cpu(), B, L);
    size_t bytes = m->layout.total * sizeof(real);
    real *w = CALLOC(m->layout.total, sizeof *w);
    m->be->download(w, m->params, bytes);
    d->be->upload(d->params, w, bytes);
    free(w);
    size_t nb = m->expert_bias.numel * sizeof(real);
    if (nb) {
        real *bias = CALLOC(m->expert_bias.numel, sizeof *bias);
        m->be->download(bias, m->expert_bias, nb);
        d->be->upload(d->expert_bias, bias, nb);
        free(bias);
    }
}

static int is_eos(const SampleOptions *o, int32_t id) {
    for (int i = 0; i < o->n_eos; i++)
        if (o->eos[i] == id) return 1;
    return 0;
}

// Bytes the decoded prompt and the decoded sequence have in common: where the
// continuation starts in the text (a tokenizer may join the two differently).
static size_t common_prefix(const char *a, const char *b) {
    size_t i = 0;
    while (a[i] && a[i] == b[i]) i++;
    return i;
}

// The text of s: every id decoded, cut where a stop string was found.
static char *seq_text(Tokenizer *tok, const Seq *s) {
    size_t len;
    char *text = tokenizer_decode(tok, s->ids, s->len, &len);
    if (s->stop_at < len) text[s->stop_at] = '\0';
    return text;
}

// Ends s at the first stop string in its continuation, if there is one.
static void check_stops(Tokenizer *tok, Seq *s, const SampleOptions *o) {
    if (o->n_stops == 0) return;
    size_t len;
    char *prompt = tokenizer_decode(tok, s->ids, s->prompt_len, &len);
    char *text = tokenizer_decode(tok, s->ids, s->len, &len);
    size_t from = common_prefix(prompt, text);
    for (int i = 0; i < o->n_stops; i++) {
        char *hit = strstr(text + from, o->stops[i]);
        if (hit && (size_t)(hit - text) < s->stop_at) {
            s->stop_at = (size_t)(hit - text);
            s->done = 1;
        }
    }
    free(prompt);
    free(text);
}

// The next id of s after the logits of its last id: appended, unless EOS.
static void seq_advance(Seq *s, Tokenizer *tok, const real *logits, int V,
                        const SampleOptions *o) {
    int32_t next = sample_pick(logits, V, &o->pick, &s->rng);
    s->generated++;
    if (is_eos(o, next)) {
        s->done = 1;
        return;
    }
    s->ids[s->len++] = next;
    if (s->generated >= o->tokens) s->done = 1;
    check_stops(tok, s, o);
}

// The tokens a full cache of L keeps: its last half.
static size_t window_keep(size_t L) { return L / 2 ? L / 2 : 1; }

// This step's token and position of s; a full cache starts again from its last half.
static void seq_feed(Seq *s, size_t L, int32_t *tok, int32_t *pos) {
    if (s->done) {
        *tok = *pos = 0;   // a finished row still computes; its cache is no longer read
        return;
    }
    if (s->cached == L) {
        s->start = s->len - window_keep(L);
        s->cached = 0;
    }
    *tok = s->ids[s->start + s->cached];
    *pos = (int32_t)s->cached;
}

static void seq_record(Seq *s, const real *row, size_t V, const SampleOptions *o) {
    size_t at = s->start + s->cached - 1;   // the id just fed
    if (o->dump) memcpy(s->logits + at * V, row, V * sizeof *row);
}

static void dump_write(const char *path, const Seq *seqs, int n, size_t V) {
    hid_t f = h5io_create(path);
    for (int i = 0; i < n; i++) {
        char name[64];
        hsize_t len = seqs[i].len, lv[2] = {seqs[i].len - 1, V};
        snprintf(name, sizeof name, "/%d/tokens", i);
        h5io_write_i32(f, name, seqs[i].ids, 1, &len);
        snprintf(name, sizeof name, "/%d/logits", i);
        h5io_write_real(f, name, seqs[i].logits, 2, lv);
    }
    h5io_close(f);
}

static void decode_loop(Model *d, Tokenizer *tok, Seq *seqs, int n, const SampleOptions *o) {
    size_t V = (size_t)d->cfg.vocab, L = d->cache_len;
    int32_t *in = CALLOC(3 * (size_t)n, sizeof *in);   // (n) tokens, (n) targets, (n) positions
    real *logits = CALLOC((size_t)n * V, sizeof *logits); // (n, V)
    // A prompt longer than the cache starts where filling it would have left it.
    for (int i = 0; i < n; i++)
        if (seqs[i].prompt_len > L) seqs[i].start = seqs[i].prompt_len - window_keep(L);
    for (;;) {
        int live = 0;
        for (int i = 0; i < n; i++) {
            seq_feed(&seqs[i], L, in + i, in + 2 * n + i);
            live += !seqs[i].done;
        }
        if (!live) break;
        model_set_batch(d, in, in + n);
        model_set_positions(d, in + 2 * n);
        model_forward(d);
        d->be->download(logits, d->logits.v, (size_t)n * V * sizeof *logits);
        for (int i = 0; i < n; i++) {
            Seq *s = &seqs[i];
            if (s->done) continue;
            s->cached++;
            seq_record(s, logits + (size_t)i * V, V, o);
            if (s->start + s->cached == s->len) seq_advance(s, tok, logits + (size_t)i * V,
                                                            (int)V, o);
        }
    }
    free(logits);
    free(in);
}

static void seqs_free(Seq *seqs, int n) {
    for (int i = 0; i < n; i++) {
        free(seqs[i].ids);
        free(seqs[i].logits);
    }
    free(seqs);
}

// Encodes every prompt into its sequence, room for the new tokens made. Returns the
// longest prompt, or -1 with err set.
static long seqs_encode(Seq *seqs, Tokenizer *tok, const char *const *prompts, int n,
                        const SampleOptions *o, size_t V, char *err, size_t n_err) {
    size_t longest = 0;
    for (int i = 0; i < n; i++) {
        Seq *s = &seqs[i];
        // An empty prompt starts from a newline, as if a text began there.
        const char *start = prompts[i][0] ? prompts[i] : "\n";
        if (tokenizer_encode(tok, start, strlen(start), &s->ids, &s->len, &s->cap, err,
                             n_err) != 0)
            return -1;
        if (s->len == 0) {
            snprintf(err, n_err, "prompt %d encodes to no tokens", i + 1);
            return -1;
        }
        s->prompt_len = s->len;
        s->stop_at = SIZE_MAX;
        s->cap = s->len + (size_t)o->tokens + 1;
        s->ids = realloc(s->ids, s->cap * sizeof *s->ids);
        CHECK(s->ids, "out of memory");
        s->done = o->tokens == 0;
        rng_init(&s->rng, o->seed + (unsigned long long)i);
        if (o->dump) s->logits = CALLOC(s->cap * V, sizeof *s->logits);
        longest = s->len > longest ? s->len : longest;
    }
    return (long)longest;
}

int sample_batch(const Model *m, Tokenizer *tok, const char *const *prompts, int n,
                 const SampleOptions *o, char **texts, char *err, size_t n_err) {
    size_t V = (size_t)m->cfg.vocab;
    Tokenizer *bytes = tok ? NULL : tokenizer_open(TOKENIZER_BYTES, NULL, err, n_err);
    if (!tok) tok = bytes;
    Seq *seqs = CALLOC((size_t)n, sizeof *seqs);
    long longest = seqs_encode(seqs, tok, prompts, n, o, V, err, n_err);
    if (longest < 0) {
        seqs_free(seqs, n);
        tokenizer_free(bytes);
        return -1;
    }
    size_t L = (size_t)longest + (size_t)o->tokens, T = (size_t)m->cfg.seq_len;
    if (o->tokens > 0) {
        Model d;
        decoder_init(&d, m, (size_t)n, L < T ? L : T);
        decode_loop(&d, tok, seqs, n, o);
        model_free(&d);
    }
    if (o->dump) dump_write(o->dump, seqs, n, V);
    for (int i = 0; i < n; i++)
        texts[i] = seq_text(tok, &seqs[i]);
    seqs_free(seqs, n);
    tokenizer_free(bytes);
    return 0;
}

char *sample_text(const Model *m, Tokenizer *tok, const char *prompt, int n_tokens,
                  double temperature, double top_p, unsigned long long seed, char *err,
                  size_t n) {
    SampleOptions o = {.tokens = n_tokens, .pick = {temperature, 0, top_p}, .seed = seed};
    char *text = NULL;
    return sample_batch(m, tok, &prompt, 1, &o, &text, err, n) == 0 ? text : NULL;
}
