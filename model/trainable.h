// trainable.h: which tensors train (trainable masks from text, for freezing and fine-tuning).
//
// An expression is a comma-separated list of items (spaces around items are ignored);
// the tensors it matches are the union of what each item matches:
//   all, none           every tensor / no tensor
//   embed               model.embed_tokens
//   head                lm_head; with tied embeddings lm_head IS embed_tokens, so `head`
//                       and `embed` match the same tensor
//   norm                every RMSNorm, the final model.norm included
//   attn                q, k, v and o projections of every layer
//   router              router gate (and noise) weights of every MoE layer
//   experts             every routed expert
//   shared              every shared expert
//   dense               the SwiGLU MLP of every dense (non-MoE) layer
//   layers.<L>.<part>   one part of layer L: attn, router, norm (that layer's two norms,
//                       not the final one), experts, shared, dense (alias: mlp)
//   layers.<L>.experts.<J>          routed expert J of layer L
//   layers.<L>.shared_experts.<J>   shared expert J of layer L
// <L> and <J> are a non-negative index or `*` (every layer / expert where the part
// exists: `layers.*.experts.3` is expert 3 of every MoE layer). An item that names
// something the model lacks (a layer or expert out of range, `layers.0.router` on a dense
// layer 0, `shared` without shared experts) is an error rather than a silent no-op, so a
// typo never trains or freezes the wrong thing. ESFT's `auto` is not an item: the caller
// expands it (model/esft.h, esft_to_expr) first.
#ifndef MOE_TRAINABLE_H
#define MOE_TRAINABLE_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "layout.h"

// Sets flags[i] = value (one flag per layout tensor) for every tensor matched by expr.
// Returns the number of distinct tensors matched (0 for a blank expr), or -1 with a
// one-line error in err naming the offending item and what is allowed; on error flags
// is left untouched.
int trainable_apply(const Layout *lay, const ModelConfig *cfg, const char *expr, uint8_t *flags,
                    uint8_t value, char *err, size_t n);

// trainable = what train_expr matches minus what freeze_expr matches. A NULL train_expr
// means "all", a NULL freeze_expr means nothing. Returns 0, or -1 with a one-line error
// in err (prefixed "train: " or "freeze: ", or saying that nothing is left to train).
int trainable_select(const Layout *lay, const ModelConfig *cfg, const char *train_expr,
                     const char *freeze_expr, uint8_t *trainable, char *err, size_t n);

// A compact summary of a trainable mask for logs, e.g. "all", "none", "experts, router"
// or "layers.0.experts.{1,5}, layers.2.experts.{3}". Whole kinds are named by their
// word, whole parts of a layer by layers.<L>.<part>, complete experts by index, and any
// other trainable tensor by its name. Ends in "..." when it does not fit in n bytes.
void trainable_describe(const Layout *lay, const uint8_t *trainable, char *out, size_t n);

#endif
