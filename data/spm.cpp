// spm.cpp: the C face of libsentencepiece (spm.h).
#include "spm.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

struct SpmModel {
    sentencepiece::SentencePieceProcessor sp;
};

extern "C" SpmModel *spm_open(const char *path, char *err, size_t n) {
    SpmModel *m = new (std::nothrow) SpmModel;
    if (!m) return std::snprintf(err, n, "%s: out of memory", path), nullptr;
    const auto status = m->sp.Load(path);
    if (!status.ok()) {
        std::snprintf(err, n, "%s: not a SentencePiece model: %s", path,
                      status.ToString().c_str());
        delete m;
        return nullptr;
    }
    return m;
}

extern "C" void spm_free(SpmModel *m) { delete m; }

extern "C" int spm_vocab(const SpmModel *m) { return m->sp.GetPieceSize(); }

extern "C" int32_t *spm_encode(const SpmModel *m, const char *text, size_t len, size_t *n_ids,
                               char *err, size_t n) {
    std::vector<int> ids;
    const auto status = m->sp.Encode(absl::string_view(text, len), &ids);
    if (!status.ok()) return std::snprintf(err, n, "SentencePiece: %s", status.ToString().c_str()), nullptr;
    int32_t *out = static_cast<int32_t *>(std::malloc((ids.size() + 1) * sizeof *out));
    if (!out) return std::snprintf(err, n, "out of memory encoding %zu bytes", len), nullptr;
    for (size_t i = 0; i < ids.size(); i++) out[i] = ids[i];
    *n_ids = ids.size();
    return out;
}

static char *copy_out(const std::string &s, size_t *len) {
    char *out = static_cast<char *>(std::malloc(s.size() + 1));
    if (!out) return nullptr;
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = 0;
    *len = s.size();
    return out;
}

// Runs of known ids decode together (pieces join across ids: byte pieces make one
// character); an unknown id stands alone as U+FFFD.
extern "C" char *spm_decode(const SpmModel *m, const int32_t *ids, size_t n_ids, size_t *len) {
    std::string text;
    std::vector<int> run;
    const int vocab = m->sp.GetPieceSize();
    for (size_t i = 0; i <= n_ids; i++) {
        if (i < n_ids && ids[i] >= 0 && ids[i] < vocab) {
            run.push_back(ids[i]);
            continue;
        }
        std::string part;
        if (!run.empty() && m->sp.Decode(run, &part).ok()) text += part;
        run.clear();
        if (i < n_ids) text += "\xEF\xBF\xBD";
    }
    return copy_out(text, len);
}

extern "C" int spm_train_bpe(const char *const *inputs, size_t n_inputs, int vocab_size,
                             const char *prefix, char *err, size_t n) {
    std::string input;
    for (size_t i = 0; i < n_inputs; i++) {
        if (std::strchr(inputs[i], ','))
            return std::snprintf(err, n, "%s: a comma in an input's name is not supported "
                                 "(SentencePiece splits its input list at commas)", inputs[i]), -1;
        input += (i ? "," : "") + std::string(inputs[i]);
    }
    // Identity normalisation, whitespace kept and unknown characters as bytes: the text
    // decodes back to exactly what was encoded.
    const std::unordered_map<std::string, std::string> args = {
        {"input", input},
        {"model_prefix", prefix},
        {"model_type", "bpe"},
        {"vocab_size", std::to_string(vocab_size)},
        {"normalization_rule_name", "identity"},
        {"remove_extra_whitespaces", "false"},
        {"byte_fallback", "true"},
        {"character_coverage", "0.9995"},
        {"max_sentence_length", "16384"},
        {"train_extremely_large_corpus", "false"},
    };
    const auto status = sentencepiece::SentencePieceTrainer::Train(args);
    if (!status.ok())
        return std::snprintf(err, n, "SentencePiece trainer: %s", status.ToString().c_str()), -1;
    return 0;
}
