"""Reference tokenizers for tests/test_tokenizer.py, run by the venv's interpreter
(build/venv-tok: PyPI `tokenizers` and `sentencepiece`, installed by `make deps-test`).

  tokenizer_ref.py train-bpe CORPUS OUT.json STYLE   STYLE: llama3 (Sequence[Split,
                                                     ByteLevel]), qwen2 (NFC, Sequence[Split,
                                                     ByteLevel]) or gpt2 (NFC, ByteLevel)
  tokenizer_ref.py train-spm CORPUS PREFIX
  tokenizer_ref.py encode TOKENIZER TEXT OUT         ids of TEXT as little-endian int32
"""
import array
import sys

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Llama-3's pre-tokenizer pattern (its tokenizer.json's Split regex).
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's: single digits.
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def train_bpe(corpus, out, style):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import trainers
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style in ("llama3", "qwen2"):
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3 if style == "llama3" else QWEN2),
                                 behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([corpus], trainer)
    tok.save(out)


def train_spm(corpus, prefix):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=3000, model_type="bpe",
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        byte_fallback=True, user_defined_symbols=SPECIAL, max_sentence_length=16384,
        minloglevel=2)


def encode(path, text_path, out):
    with open(text_path, encoding="utf-8", newline="") as f:
        text = f.read()
    if path.endswith(".json"):
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids
    else:
        import sentencepiece as spm
        ids = spm.SentencePieceProcessor(model_file=path).encode(text)
    with open(out, "wb") as f:
        array.array("i", ids).tofile(f)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"train-bpe": train_bpe, "train-spm": train_spm, "encode": encode}[cmd](*args)
