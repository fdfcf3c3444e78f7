"""How tests/data/llamacpp_ids_smollm2.jsonl.gz was made: llama.cpp's token ids for 500
rating texts (the first 100 usable ShareGPT records x the first 5 released prompts).

The texts are never stored (the released prompts may only be read from ../shared/reference);
each row keeps the sample's index and id, the prompt's index, sha256 of the text and the ids.
llama.cpp runs in its own venv (`python3 -m venv /tmp/lcpp && /tmp/lcpp/bin/pip install
llama-cpp-python`, built from source), never in the project's, so it takes two steps:

  # 1. texts, with the project's venv (writes the texts to a temporary file only)
  .venv/bin/python tests/data/make_llamacpp_ids.py texts /tmp/texts.jsonl
  # 2. ids, with llama-cpp-python (reads only that file and the GGUF)
  /tmp/lcpp/bin/python tests/data/make_llamacpp_ids.py ids /tmp/texts.jsonl \\
      "$(.venv/bin/python -c 'from selectit_jax import assets; print(assets.default_gguf_path())')" \\
      tests/data/llamacpp_ids_smollm2.jsonl.gz

Step 1 builds what the scorer builds with configs/smollm2_135m.py: records from the default
data config, prompts read with readlines() (prompts.load_prompts), the default template.
Step 2 tokenizes as llama.cpp does at inference: no special-token parsing, BOS as the GGUF's
tokenizer.ggml.add_bos_token says (false for SmolLM2). The test reads rating_texts() from here.
"""

import gzip
import hashlib
import json
import os
import sys

NUM_RECORDS = 100
NUM_PROMPTS = 5
# Records are read in input order, so the first 100 usable ones of a 400-record head are those
# of the whole file (asserted below); reading the whole 125 MB file would only cost time.
READ_LIMIT = 400
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_PROMPTS = os.path.join(REPO, "..", "shared", "reference", "rating_prompt.txt")


def rating_texts(prompts_path: str = REFERENCE_PROMPTS):
  """[(sample index, sample id, prompt index, text)] in record-major order."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)  # configs/ lives at the repository root
  from configs import smollm2_135m
  from selectit_jax.data import prompts
  from selectit_jax.data import records

  cfg = smollm2_135m.get_config()
  data = cfg.data.copy_and_resolve_references()
  with data.unlocked():
    data.limit = READ_LIMIT
  recs, _, info = records.read_records(data)
  if len(recs) < NUM_RECORDS or info.num_read < READ_LIMIT:
    raise RuntimeError(f"only {len(recs)} usable records in the first {info.num_read}")
  ps = prompts.load_prompts(prompts_path)[:NUM_PROMPTS]
  template = prompts.template_from_config(cfg.prompts)
  return [
      (r.index, r.id, k, prompts.build_text(p, r.instruction, r.response, template))
      for r in recs[:NUM_RECORDS]
      for k, p in enumerate(ps)
  ]


def sha256(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_texts(out: str) -> None:
  with open(out, "w", encoding="utf-8") as f:
    for index, sample_id, prompt, text in rating_texts():
      f.write(json.dumps(dict(index=index, id=sample_id, prompt=prompt, text=text)) + "\n")


def write_ids(texts_path: str, gguf_path: str, out: str) -> None:
  import llama_cpp

  llm = llama_cpp.Llama(model_path=gguf_path, vocab_only=True, verbose=False)
  add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true")
  with open(texts_path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  # mtime=0: the same ids give the same bytes, so regenerating does not churn the file.
  with gzip.GzipFile(out, "wb", mtime=0) as f:
    for row in rows:
      ids = llm.tokenize(row["text"].encode("utf-8"), add_bos=add_bos, special=False)
      meta = dict(
          index=row["index"],
          id=row["id"],
          prompt=row["prompt"],
          sha256=sha256(row["text"]),
          ids=ids,
      )
      f.write((json.dumps(meta, separators=(",", ":")) + "\n").encode())
  print(f"{len(rows)} texts, add_bos={add_bos}, llama-cpp-python {llama_cpp.__version__} -> {out}")


if __name__ == "__main__":
  if sys.argv[1:2] == ["texts"] and len(sys.argv) == 3:
    write_texts(sys.argv[2])
  elif sys.argv[1:2] == ["ids"] and len(sys.argv) == 5:
    write_ids(*sys.argv[2:])
  else:
    sys.exit(__doc__)
