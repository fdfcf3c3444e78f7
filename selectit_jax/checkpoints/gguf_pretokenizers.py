"""Pre-tokenizers for GGUF byte-level BPE vocabularies, chosen by `tokenizer.ggml.pre`.

A GGUF stores no tokenizer.json, only the name of the rule that cuts text into words before
the BPE merges run (`tokenizer.ggml.pre`). llama.cpp maps that name to a pre-type
(`llama_vocab::impl::load` in src/llama-vocab.cpp) and each pre-type to a list of regexes
(`llm_tokenizer_bpe` there), applied one after another: each regex cuts every piece of the
previous one into its matches and the gaps between them (tokenizers' Split "isolated").
transformers' GGUF converter knows only some names and silently falls back to plain GPT-2
byte-level splitting for the rest (SmolLM2's "smollm" among them), so a model would be fed
ids it was not trained on. The table below rebuilds the rule with `tokenizers` objects, and
an unknown name is an error rather than a silent fallback.
"""

from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

# The regexes, written for tokenizers' Oniguruma engine. llama.cpp spells the contractions
# case by case ('[sS]...) since its engine has no (?i:); that form is kept so "'ſ" and the
# like (which (?i:) would fold) cut the same way.
_CONTRACTIONS = r"'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])"
# GPT-2's rule (also what ByteLevel(use_regex=True) applies).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# LLaMA-3: numbers in groups of up to 3 digits, a letter run may take one leading
# non-letter, newlines gathered with the whitespace before them.
LLAMA3_REGEX = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2: LLaMA-3's rule with single digits.
QWEN2_REGEX = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's fallback pre-type: punctuation runs, then GPT-2, then numbers in runs and
# three-digit groups.
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")


def _splits_then_bytes(*regexes):
  """Each regex cuts the previous pieces (matches and gaps kept), then the bytes are mapped."""
  steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
  return pre_tokenizers.Sequence(
      steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  )


def _gpt2():
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm():
  # Every digit alone, then GPT-2's rule: the form SmolLM2's own tokenizer.json has.
  return pre_tokenizers.Sequence(
      [
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ]
  )


_BUILDERS = {
    "gpt2": _gpt2,
    "smollm": _smollm,
    "llama3": lambda: _splits_then_bytes(LLAMA3_REGEX),
    "qwen2": lambda: _splits_then_bytes(QWEN2_REGEX),
    "default": lambda: _splits_then_bytes(*DEFAULT_REGEXES),
}

# tokenizer.ggml.pre -> rule, for the names llama.cpp gives exactly these regexes. Names
# llama.cpp maps to other regexes are left out on purpose: they are refused, not guessed.
PRE_TOKENIZER_RULES = {
    "default": "default",
    # LLAMA_VOCAB_PRE_TYPE_GPT2 and the pre-types sharing its regex (MPT, OLMO, JAIS, ...).
    **dict.fromkeys(
        (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "mpt",
            "olmo",
            "jais",
            "exaone4",
            "trillion",
            "granite-docling",
        ),
        "gpt2",
    ),
    # LLAMA_VOCAB_PRE_TYPE_SMOLLM and those sharing its regexes (\p{N}, then GPT-2's).
    **dict.fromkeys(
        (
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ),
        "smollm",
    ),
    # LLAMA_VOCAB_PRE_TYPE_LLAMA3, DBRX, SMAUG.
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        "llama3",
    ),
    # LLAMA_VOCAB_PRE_TYPE_QWEN2, STABLELM2, HUNYUAN, SOLAR_OPEN.
    **dict.fromkeys(
        (
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
        ),
        "qwen2",
    ),
}


def gguf_pre_tokenizer(pre_name: str | None, path: str = "<gguf>"):
  """The pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre` = pre_name.

  A missing name is llama.cpp's 'default' (it warns that quality degrades); an unknown one
  raises ValueError naming the file and the name.
  """
  name = pre_name or "default"
  if name not in PRE_TOKENIZER_RULES:
    raise ValueError(
        f"{path}: tokenizer.ggml.pre = {name!r} is a pre-tokenizer this project does not "
        f"know; its ids would differ from llama.cpp's. Known: {sorted(PRE_TOKENIZER_RULES)}"
    )
  return _BUILDERS[PRE_TOKENIZER_RULES[name]]()


def apply_gguf_pre_tokenizer(
    backend, model: str | None, pre_name: str | None, path: str = "<gguf>"
):
  """Sets `backend.pre_tokenizer` (a tokenizers.Tokenizer) from the GGUF's
  tokenizer.ggml.model and tokenizer.ggml.pre; returns `backend`.

  Only byte-level BPE ("gpt2") vocabularies have pre-types in llama.cpp; a SentencePiece
  ("llama") or other vocabulary is left as transformers built it.
  """
  if model == "gpt2":
    backend.pre_tokenizer = gguf_pre_tokenizer(pre_name, path)
  return backend
