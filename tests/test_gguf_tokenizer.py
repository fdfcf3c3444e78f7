"""GGUF tokenizers cut text the way llama.cpp does (tokenizer.ggml.pre), checked against ids
llama.cpp itself produced (tests/data/make_llamacpp_ids.py) and llama.cpp's regex rules."""

import gzip
import importlib.util
import json
import os

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from conftest import write_sentencepiece, write_tiny_checkpoint
from selectit_jax import assets
from selectit_jax import checkpoints
from selectit_jax.checkpoints import gguf_pretokenizers
from selectit_jax.checkpoints.tokenizer import load_tokenizer
from selectit_jax.training.export import export_hf

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
LLAMACPP_IDS = os.path.join(DATA, "llamacpp_ids_smollm2.jsonl.gz")


def _maker():
  spec = importlib.util.spec_from_file_location(
      "make_llamacpp_ids", os.path.join(DATA, "make_llamacpp_ids.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def smollm2_tok():
  return load_tokenizer(assets.default_gguf_path())


def test_ids_match_llamacpp_on_500_rating_texts(smollm2_tok):
  maker = _maker()
  if not os.path.exists(maker.REFERENCE_PROMPTS):
    pytest.skip(f"released prompts not found: {os.path.normpath(maker.REFERENCE_PROMPTS)}")
  with gzip.open(LLAMACPP_IDS, "rt") as f:
    expected = [json.loads(line) for line in f]
  texts = maker.rating_texts()
  assert len(texts) == len(expected) == 500
  for (index, sample_id, prompt, text), row in zip(texts, expected):
    # Same text as llama.cpp tokenized (records, prompt file and template unchanged).
    assert (index, sample_id, prompt, maker.sha256(text)) == (
        row["index"],
        row["id"],
        row["prompt"],
        row["sha256"],
    )
  ours = smollm2_tok.encode_batch([t[-1] for t in texts])
  bad = [(r["index"], r["prompt"]) for o, r in zip(ours, expected) if o != r["ids"]]
  assert (
      not bad
  ), f"{len(bad)} of 500 texts tokenized unlike llama.cpp, first (index, prompt): {bad[:5]}"


def test_newline_before_digit_is_one_token(smollm2_tok):
  ids = smollm2_tok.encode("\n\n1")
  assert [smollm2_tok.decode([i]) for i in ids] == ["\n\n", "1"]


def test_unknown_pre_name_is_refused(tmp_path):
  path = str(tmp_path / "m.gguf")
  with pytest.raises(ValueError, match=r"m\.gguf.*'no-such-pre'"):
    gguf_pretokenizers.gguf_pre_tokenizer("no-such-pre", path)
  # llama.cpp spells GPT-2's pre-type "gpt-2"; it refuses "gpt2", so do we.
  with pytest.raises(ValueError, match="'gpt2'"):
    gguf_pretokenizers.gguf_pre_tokenizer("gpt2", path)


def test_sentencepiece_vocab_is_left_alone(smollm2_tok):
  backend = smollm2_tok.hf.backend_tokenizer
  before = backend.pre_tokenizer.__getstate__()
  gguf_pretokenizers.apply_gguf_pre_tokenizer(backend, "llama", "anything", "x.gguf")
  assert backend.pre_tokenizer.__getstate__() == before


# Pieces each rule cuts, worked out by hand from llama.cpp's regex lists (llm_tokenizer_bpe).
_SPLITS = {
    "12345": {
        "gpt2": ["12345"],
        "smollm": ["1", "2", "3", "4", "5"],
        "llama3": ["123", "45"],
        "qwen2": ["1", "2", "3", "4", "5"],
        "default": ["123", "45"],
    },
    " 12345": {
        "gpt2": [" 12345"],
        "smollm": [" ", "1", "2", "3", "4", "5"],
        "llama3": [" ", "123", "45"],
        "qwen2": [" ", "1", "2", "3", "4", "5"],
        "default": [" ", "123", "45"],
    },
    "\n\n1": {
        "gpt2": ["\n", "\n", "1"],
        "smollm": ["\n\n", "1"],
        "llama3": ["\n\n", "1"],
        "qwen2": ["\n\n", "1"],
        "default": ["\n", "\n", "1"],
    },
    "Hello, world's 2024!": {
        "gpt2": ["Hello", ",", " world", "'s", " 2024", "!"],
        "smollm": ["Hello", ",", " world", "'s", " ", "2", "0", "2", "4", "!"],
        "llama3": ["Hello", ",", " world", "'s", " ", "202", "4", "!"],
        "qwen2": ["Hello", ",", " world", "'s", " ", "2", "0", "2", "4", "!"],
        # Punctuation runs are cut first, so "'s" does not survive.
        "default": ["Hello", ",", " world", "'", "s", " ", "202", "4", "!"],
    },
    "I'M end.\n(a": {
        "gpt2": ["I", "'", "M", " end", ".", "\n", "(", "a"],
        "smollm": ["I", "'", "M", " end", ".", "\n", "(", "a"],
        "llama3": ["I", "'M", " end", ".\n", "(a"],
        "qwen2": ["I", "'M", " end", ".\n", "(a"],
        "default": ["I", "'", "M", " end", ".", "\n", "(", "a"],
    },
}
_RULE_OF = {
    "gpt2": "gpt-2",
    "smollm": "smollm",
    "llama3": "llama-bpe",
    "qwen2": "qwen2",
    "default": "default",
}


@pytest.mark.parametrize("text", list(_SPLITS))
@pytest.mark.parametrize("rule", list(_RULE_OF))
def test_pre_tokenizer_splits_like_llamacpp(rule, text):
  pre = gguf_pretokenizers.gguf_pre_tokenizer(_RULE_OF[rule])
  byte_of = {c: b for b, c in bytes_to_unicode().items()}
  pieces = [
      bytes(byte_of[c] for c in piece).decode("utf-8") for piece, _ in pre.pre_tokenize_str(text)
  ]
  assert pieces == _SPLITS[text][rule]


def test_every_name_builds():
  for name in gguf_pretokenizers.PRE_TOKENIZER_RULES:
    assert gguf_pretokenizers.gguf_pre_tokenizer(name).pre_tokenize_str("a 1")
  assert gguf_pretokenizers.gguf_pre_tokenizer(None).pre_tokenize_str("a 1")  # 'default'


def test_exported_tokenizer_keeps_the_rule(smollm2_tok, tmp_path):
  """The trainer's export writes tokenizer.json; reloaded, it still cuts "\\n\\n1" in 2."""
  write_tiny_checkpoint(str(tmp_path / "src"), tokenizer=False)
  model = checkpoints.load_model(str(tmp_path / "src"))
  out = export_hf(str(tmp_path / "hf"), model.config, model.params, smollm2_tok)
  with open(os.path.join(out, "tokenizer.json")) as f:
    assert json.load(f)["pre_tokenizer"]["type"] == "Sequence"
  exported = load_tokenizer(out)  # transformers.AutoTokenizer.from_pretrained
  ids = exported.encode("\n\n1")
  assert [exported.decode([i]) for i in ids] == ["\n\n", "1"]
  assert ids == smollm2_tok.encode("\n\n1")


def _write_sentencepiece_gguf(path, sp_dir, add_bos):
  """A SentencePiece GGUF ("llama") with conftest's tiny vocabulary, as llama.cpp's converter
  writes one: pieces, scores, token types, special ids; `add_bos` None leaves the key out."""
  import gguf
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
  n = sp.get_piece_size()

  def token_type(i):
    for check, kind in (
        (sp.is_unknown, gguf.TokenType.UNKNOWN),
        (sp.is_control, gguf.TokenType.CONTROL),
        (sp.is_byte, gguf.TokenType.BYTE),
        (sp.is_unused, gguf.TokenType.UNUSED),
    ):
      if check(i):
        return kind
    return gguf.TokenType.NORMAL

  writer = gguf.GGUFWriter(path, "llama")
  writer.add_tokenizer_model("llama")
  writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
  writer.add_token_scores([sp.get_score(i) for i in range(n)])
  writer.add_token_types([token_type(i) for i in range(n)])
  writer.add_unk_token_id(sp.unk_id())
  writer.add_bos_token_id(sp.bos_id())
  writer.add_eos_token_id(sp.eos_id())
  if add_bos is not None:
    writer.add_add_bos_token(add_bos)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("add_bos", [None, False, True])
def test_sentencepiece_gguf_bos_like_transformers(add_bos, tmp_path):
  """Without tokenizer.ggml.add_bos_token a SentencePiece GGUF gets BOS (transformers,
  llama.cpp and LLaMA-2's own tokenizer do); the key, when present, decides."""
  import transformers

  write_sentencepiece(str(tmp_path))
  name = f"sp_{add_bos}.gguf"
  _write_sentencepiece_gguf(str(tmp_path / name), str(tmp_path), add_bos)
  ours = load_tokenizer(str(tmp_path / name))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=name)
  texts = [
      "Rate the response from 1 to 5.\nInstruction:Write a poem.\nThe answer is: \n",
      "The sea is wide and deep; 2345 waves roll in.",
  ]
  for text in texts:
    assert ours.encode(text) == ref(text)["input_ids"]
  assert (ours.encode(texts[0])[0] == ours.bos_id) == (add_bos is not False)
  assert ours.bos_id == 1
