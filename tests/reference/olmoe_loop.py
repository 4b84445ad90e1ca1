#!/usr/bin/env python3
"""transformers' side of tests/test_loop.py, run by build/venv-hf's interpreter
(transformers 4.45.2 over Debian's torch, from `make deps-test`).

  olmoe_loop.py make CORPUS HF_DIR     a Llama-3-style byte-level BPE tokenizer trained on
                                       CORPUS by PyPI `tokenizers`, and a tiny random
                                       OlmoeForCausalLM over its vocabulary, saved together
                                       in HF_DIR (AutoTokenizer and AutoModelForCausalLM
                                       load it, as a hub download)
  olmoe_loop.py generate HF_DIR PROMPT N
                                       loads HF_DIR with AutoTokenizer and
                                       AutoModelForCausalLM and prints, as JSON, the prompt's
                                       ids, N greedy new ids (generate, do_sample=False), the
                                       bytes of every token (hex) and the whole sequence
                                       decoded
"""
import json
import os
import sys

import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode  # 4.x and 5.x alike

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from families_transformers import random_model  # noqa: E402
from tokenizer_ref import train_bpe  # noqa: E402

SEQ_LEN = 64


def make(corpus, hf_dir):
    os.makedirs(hf_dir, exist_ok=True)
    tok_file = os.path.join(hf_dir, "trained-tokenizer.json")
    train_bpe(corpus, tok_file, "llama3")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=tok_file)
    os.remove(tok_file)
    tok.save_pretrained(hf_dir)
    random_model("olmoe", hf_dir, vocab_size=len(tok), max_position_embeddings=SEQ_LEN)
    print(f"{hf_dir}: OlmoeForCausalLM, vocab {len(tok)}, seq_len {SEQ_LEN}")


def token_bytes(tok, ids):
    """Each id's bytes: byte-level BPE spells bytes as characters (bytes_to_unicode)."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    return [piece.encode() if i in special else bytes(byte_of[c] for c in piece)
            for i, piece in zip(ids, tok.convert_ids_to_tokens(ids))]


def generate(hf_dir, prompt, n):
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, torch_dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=int(n), min_new_tokens=int(n), pad_token_id=0)
    seq = out[0].tolist()
    print(json.dumps({"model": type(model).__name__, "tokenizer": type(tok).__name__,
                      "prompt_ids": ids[0].tolist(), "new_ids": seq[ids.shape[1]:],
                      "pieces": [b.hex() for b in token_bytes(tok, seq)],
                      "text": tok.decode(seq)}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "make":
        make(*sys.argv[2:])
    elif len(sys.argv) == 5 and sys.argv[1] == "generate":
        generate(*sys.argv[2:])
    else:
        sys.exit(__doc__)
