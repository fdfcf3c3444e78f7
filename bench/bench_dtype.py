r"""What bf16 weights and matmuls do to the ratings and to the ranking, against fp32.

    python bench/bench_dtype.py                     # 100 records × 5 released prompts (~15 min on 2 idle cores)
    python bench/bench_dtype.py --num_records=16    # a quick look

The same texts (bench/common.py `bench_items`: the first `num_records` usable ShareGPT records
× the K released prompts, SmolLM2 from configs/smollm2_135m.py) are rated by the engine
(`Scorer.rate`) twice in this process: model.dtype = param_dtype = float32, then bfloat16
(norms, softmax and the logsumexp stay fp32 in models/layers.py either way). From both sets
of probabilities: max / mean |Δp|, how many token-level base ratings (argmax) move, and on the
sentence scores (Eq. 4, `--mode`, `--alpha`) Spearman's ρ, the top-`--proportion` overlap and
how many selected samples change (selection/raters.py's helpers, with select's ranking and
count). For scale, the same ranking figures for dropping one prompt in fp32 (K−1 prompts
instead of K): the method's own sensitivity. Prints the table and writes its section of
BENCHMARKS.md (--output).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selectit_jax import cli  # noqa: E402
from bench import common  # noqa: E402

_NUM_RECORDS = flags.DEFINE_integer("num_records", 100, "First N usable ShareGPT records.")
_K = flags.DEFINE_integer("k", 5, "Rating prompts per record.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", common.RELEASED_PROMPTS, "Prompt file (released layout); '' = our prompts."
)
_CONFIG = flags.DEFINE_string("config", "configs/smollm2_135m.py", "Scoring config.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Reference dtype, then the other.")
_MODE = flags.DEFINE_enum("mode", "paper", ["paper", "code"], "Score formulas (select's mode).")
_ALPHA = flags.DEFINE_float("alpha", 0.2, "Eq. 4's α.")
_PROPORTION = flags.DEFINE_float("proportion", 0.2, "Share selected (top ⌊N·p⌋).")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown report ('' = none).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir",
    "",
    "Keep each dtype's probabilities here (<dtype>.npz) and reuse them: dtypes can be rated "
    "by separate runs (--dtypes=bfloat16) side by side, the report made from both later.",
)


def rate(config, work: dict, dtype: str) -> dict:
  """Probabilities [N, K, 5] of the work's texts with weights and matmuls in `dtype`."""
  import numpy as np
  from selectit_jax import checkpoints
  from selectit_jax.parallel import sharding

  mesh = sharding.make_mesh(config.mesh)
  model = checkpoints.load_model(work["model_path"], mesh, dtype=dtype, param_dtype=dtype)
  items = work["items"]
  scorer, plan, compile_s = common.compiled_scorer(
      config, model, mesh, items, work["rating_ids"], work["tokenizer"].pad_id
  )
  samples = sorted({it.sample_index for it in items})
  row = {s: i for i, s in enumerate(samples)}
  probs = np.full((len(samples), len(work["prompts"]), len(work["rating_ids"])), np.nan)
  start = time.perf_counter()
  for rated in scorer.rate(plan.batches):
    for it, p in zip(rated.batch.items, rated.probs):
      probs[row[it.sample_index], it.prompt_index] = p
  steady_s = time.perf_counter() - start
  return dict(
      probs=probs,
      samples=np.asarray(samples),
      num_params=model.num_params,
      steady_s=steady_s,
      compile_s=compile_s,
      tokens=sum(len(it.ids) for it in items),
      load=os.getloadavg()[0],
  )


def _cached_rate(config, work: dict, dtype: str) -> dict:
  """`rate`, or its result kept in --cache_dir by an earlier run of the same texts."""
  import numpy as np

  path = os.path.join(_CACHE_DIR.value, f"{dtype}.npz") if _CACHE_DIR.value else ""
  # The texts' token ids, digested: bytes' hash() changes from process to process.
  digest = hashlib.sha256()
  for it in work["items"]:
    digest.update(np.asarray(it.ids, np.int64).tobytes() + b"|")
  ids = np.frombuffer(digest.digest(), np.uint8)
  if path and os.path.exists(path):
    with np.load(path) as f:
      if np.array_equal(f["ids"], ids):
        print(f"[bench_dtype] {dtype}: {path}", flush=True)
        return {k: (f[k] if f[k].ndim else f[k].item()) for k in f.files if k != "ids"}
  print(f"[bench_dtype] rating in {dtype} ...", flush=True)
  result = rate(config, work, dtype)
  if path:
    os.makedirs(_CACHE_DIR.value, exist_ok=True)
    np.savez(path, ids=ids, **result)
  return result


def sentence_scores(probs, mode: str, alpha: float):
  """select's sentence scores (Eq. 2-4, float64) of one rater's probabilities [N, K, R]."""
  from selectit_jax.selection import ranking

  return ranking.compute_scores(probs[:, None], mode, "sentence", alpha, 0, None)["sentence"][:, 0]


def ranking_agreement(sentence_a, sentence_b, probs, samples, num_params, mode, proportion):
  """Spearman ρ, top-set overlap |A∩B|/|A| and |A \\ B| of two sentence-score columns of the
  same samples (selection/raters.py, with select's ranking and count; `probs` [N, 2, K, R]
  decide which samples each column can rank)."""
  import ml_collections
  import numpy as np
  from selectit_jax.selection import inputs
  from selectit_jax.selection import raters

  loaded = inputs.Loaded(
      probs=probs,
      present=np.ones(probs.shape[:3], bool),
      sample_index=np.asarray(samples),
      sample_id=[str(s) for s in samples],
      models=["a", "b"],
      num_params=np.asarray([num_params] * 2),
      store_rejects=[],
      notes=[],
  )
  cfg = ml_collections.ConfigDict(
      dict(mode=mode, proportion=proportion, top_n=0, count_from="rankable")
  )
  sentence = np.stack([sentence_a, sentence_b], axis=1)
  agreement = raters.rater_stats(loaded, sentence, cfg)["agreement"][0]
  valid = raters.alone_valid(loaded)
  tops = [raters.top_set(sentence[:, j], valid[:, j], loaded.sample_index, cfg) for j in (0, 1)]
  return dict(
      spearman=agreement["spearman"],
      top_overlap=agreement["top_overlap"],
      selected=len(tops[0]),
      changed=len(tops[0] - tops[1]),
      max_ds=float(np.max(np.abs(sentence_a - sentence_b))),
  )


def compare(ref: dict, other: dict, mode: str, alpha: float, proportion: float) -> dict:
  """How `other`'s ratings of the same texts differ from `ref`'s: |Δp|, token-level base
  ratings (argmax) that move, and the sentence-level ranking (`ranking_agreement`)."""
  import numpy as np

  a, b = ref["probs"], other["probs"]
  dp = np.abs(a - b)
  out = ranking_agreement(
      sentence_scores(a, mode, alpha),
      sentence_scores(b, mode, alpha),
      np.stack([a, b], axis=1),
      ref["samples"],
      ref["num_params"],
      mode,
      proportion,
  )
  out.update(
      max_dp=float(np.max(dp)),
      mean_dp=float(np.mean(dp)),
      base_changed=int(np.sum(np.argmax(a, -1) != np.argmax(b, -1))),
      cells=int(a.shape[0] * a.shape[1]),
  )
  return out


def leave_one_prompt_out(ref: dict, mode: str, alpha: float, proportion: float) -> list[dict]:
  """For scale: the ranking with all K prompts against K−1 (each one dropped in turn), in
  the reference dtype: the method's own sensitivity to which prompts rate."""
  import numpy as np

  probs = ref["probs"]
  full = sentence_scores(probs, mode, alpha)
  rows = []
  for drop in range(probs.shape[1]):
    fewer = np.delete(probs, drop, axis=1)
    rows.append(
        ranking_agreement(
            full,
            sentence_scores(fewer, mode, alpha),
            np.stack([probs, probs], axis=1),
            ref["samples"],
            ref["num_params"],
            mode,
            proportion,
        )
    )
  return rows


def _num(x, spec: str) -> str:
  """raters' figures are None where undefined (a constant column, an empty top set)."""
  return "-" if x is None else format(x, spec)


def report(work: dict, runs: dict, cmp: dict, loo: list[dict]) -> str:
  names = list(runs)
  ref = runs[names[0]]
  n, k = ref["probs"].shape[:2]
  pct = f"{_PROPORTION.value:.0%}"
  lines = [
      f"Machine: {common.machine_description()}",
      "",
      f"Work: {n} ShareGPT records × {k} prompts ({_PROMPTS_FILE.value or 'our prompts'}) = "
      f"{n * k} texts, {ref['tokens']} tokens; SmolLM2-135M-Instruct (embedded GGUF), engine "
      f"settings of {_CONFIG.value}; sentence scores: {_MODE.value} mode, α = {_ALPHA.value}; "
      f"selection: top {pct} (⌊N·p⌋ of the {n}).",
      "",
      f"| {names[1]} vs {names[0]} | value |",
      "|---|---|",
      f"| max \\|Δp\\| (over {n}×{k}×{ref['probs'].shape[2]} probabilities) | {cmp['max_dp']:.2e} |",
      f"| mean \\|Δp\\| | {cmp['mean_dp']:.2e} |",
      f"| token-level base rating (argmax) changed | {cmp['base_changed']} of {cmp['cells']} |",
      f"| max \\|Δ sentence score\\| | {cmp['max_ds']:.2e} |",
      f"| Spearman ρ of the sentence scores | {_num(cmp['spearman'], '.4f')} |",
      f"| top-{pct} overlap | {_num(cmp['top_overlap'], '.1%')} "
      f"({cmp['selected'] - cmp['changed']} of {cmp['selected']}) |",
      f"| selected samples that change | {cmp['changed']} of {cmp['selected']} |",
      "",
      f"For scale, {names[0]} with one of the {k} prompts dropped (K−1 prompts vs K; prompt "
      "dropped: Spearman ρ / top overlap / selected samples that change):",
      "",
      "| dropped prompt | Spearman ρ | top overlap | changed |",
      "|---|---|---|---|",
  ]
  for i, r in enumerate(loo):
    lines.append(
        f"| {i + 1} | {_num(r['spearman'], '.4f')} | {_num(r['top_overlap'], '.1%')} | "
        f"{r['changed']} of {r['selected']} |"
    )
  lines += [
      "",
      "| dtype | tokens/s (steady) | compile s | 1-min load at the end |",
      "|---|---|---|---|",
  ]
  for name, r in runs.items():
    lines.append(
        f"| {name} | {r['tokens'] / r['steady_s']:.0f} | {r['compile_s']:.1f} | {r['load']:.1f} |"
    )
  lines.append("")
  lines.append(
      "Both runs on this CPU: bf16 weights and matmul inputs, each product's sum kept "
      "wider than bf16 and the result rounded to bf16 (norms, softmax and logsumexp in fp32), "
      "as GPU and TPU bf16 matmuls with fp32 accumulation do; fusion and summation order "
      "differ there, so the figures give the size of bf16's effect, not a bit-exact forecast."
  )
  lines.append(
      f"Load above {os.cpu_count()} (the cores) means other processes shared the CPU; the "
      "throughputs are for the record only, the agreement figures do not depend on it."
  )
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  config = common.load_config(_CONFIG.value)
  work = common.bench_items(config, _NUM_RECORDS.value, _PROMPTS_FILE.value, _K.value)
  print(f"[bench_dtype] {work['num_records']} records, {len(work['items'])} texts", flush=True)
  runs = {dtype: _cached_rate(config, work, dtype) for dtype in _DTYPES.value}
  if len(runs) < 2:
    return
  ref, other = (runs[d] for d in _DTYPES.value)
  cmp = compare(ref, other, _MODE.value, _ALPHA.value, _PROPORTION.value)
  loo = leave_one_prompt_out(ref, _MODE.value, _ALPHA.value, _PROPORTION.value)
  text = report(work, runs, cmp, loo)
  print("\n" + text)
  if _OUTPUT.value:
    common.write_markdown(
        _OUTPUT.value,
        "bench_dtype",
        "bf16 vs fp32 ratings and ranking (`python bench/bench_dtype.py`)",
        text,
    )


if __name__ == "__main__":
  cli.run_main(main)
