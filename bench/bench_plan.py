r"""Host side of `score` at scale: read, tokenize and plan many records; seconds and host RSS.

    python bench/bench_plan.py                          # 100k synthetic records (the documented setting)
    python bench/bench_plan.py --num_records=2000 --output=''   # a quick look

Synthetic ShareGPT records (JSONL, written to a scratch dir): each takes the instruction and
response lengths (characters) of a real ShareGPT record (the embedded file's accepted first
turns, drawn with replacement) and fills them with words drawn from the same file, so token
counts per character are close to real text. Then, as `score` does before its first step:
`records.read_records`, `batching.prepare` (the real SmolLM2 tokenizer from the embedded GGUF,
our K = 5 default prompts, configs/smollm2_135m.py's engine settings: max_tokens 2048,
truncation) and `batching.make_plan` (shared prefixes, packing, FLOP-fitted buckets; the model
config is read from the GGUF metadata, no weights are loaded). Reports the seconds of each
stage, the RSS after it and the peak RSS (VmHWM), and writes the section of BENCHMARKS.md
between the bench_plan markers (`--baseline_json`: a `--json_out` of an earlier checkout, shown
as the "before" row).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selectit_jax import cli  # noqa: E402
from bench import common  # noqa: E402

_NUM_RECORDS = flags.DEFINE_integer("num_records", 100_000, "Synthetic records to plan.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic records.")
_CONFIG = flags.DEFINE_string("config", "configs/smollm2_135m.py", "Scoring config (engine).")
_LABEL = flags.DEFINE_string("label", "this checkout", "Name of this run's row.")
_JSON_OUT = flags.DEFINE_string("json_out", "", "Also write this run's numbers here.")
_BASELINE = flags.DEFINE_string("baseline_json", "", "A --json_out of another checkout.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown report ('' = none).")
_MEASURE = flags.DEFINE_string("measure", "", "Internal: the child's records file to plan.")


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024


def _load_config():
  import importlib.util

  spec = importlib.util.spec_from_file_location("bench_config", _CONFIG.value)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def write_synthetic(path: str, num_records: int, seed: int) -> None:
  """`num_records` ShareGPT-shaped records with real ShareGPT (instruction, response) lengths
  and words, as JSONL."""
  import numpy as np

  from selectit_jax import assets
  from selectit_jax.data import records as records_lib

  config = _load_config()
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.path = assets.data_path(config.data)
  data_cfg.limit = 4000
  real, _, _ = records_lib.read_records(data_cfg)
  lengths = np.array([(len(r.instruction), len(r.response)) for r in real])
  words = np.array(" ".join(r.instruction + " " + r.response for r in real[:500]).split())
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for i, (n_ins, n_res) in enumerate(lengths[rng.integers(0, len(lengths), num_records)]):
      ins, res = (" ".join(rng.choice(words, max(1, n // 6)))[:n] or "x" for n in (n_ins, n_res))
      turns = [{"from": "human", "value": ins}, {"from": "gpt", "value": res}]
      f.write(json.dumps({"id": f"syn{i}", "conversations": turns}) + "\n")


def measure(path: str) -> dict:
  """Reads, tokenizes and plans `path` as `score` does; seconds and RSS per stage."""
  import numpy as np

  from selectit_jax import assets
  from selectit_jax import checkpoints
  from selectit_jax.checkpoints.tokenizer import load_tokenizer
  from selectit_jax.data import prompts as prompts_lib
  from selectit_jax.data import records as records_lib
  from selectit_jax.scoring import batching

  config = _load_config()
  model_path = assets.model_path(config.model)
  tokenizer = load_tokenizer(model_path)
  _, model_cfg = checkpoints.tensor_source(model_path)
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.path, data_cfg.format = path, "sharegpt"
  prompts = prompts_lib.prompts_from_config(config.prompts)
  template = prompts_lib.template_from_config(config.prompts)
  out = dict(label=_LABEL.value, rss_start=_rss_mib())

  start = time.perf_counter()
  records, _, _ = records_lib.read_records(data_cfg)
  out.update(read_s=time.perf_counter() - start, rss_read=_rss_mib(), records=len(records))
  start = time.perf_counter()
  items, rejects = batching.prepare(
      records, prompts, template, tokenizer, config.engine.max_tokens, config.engine.too_long
  )
  out.update(prepare_s=time.perf_counter() - start, rss_prepare=_rss_mib())
  start = time.perf_counter()
  plan = batching.make_plan(items, config.engine, model_cfg)
  out.update(plan_s=time.perf_counter() - start, rss_plan=_rss_mib())
  out.update(
      peak_rss=common.peak_rss_mib(),
      texts=len(items),
      rejects=len(rejects),
      tokens=int(sum(len(it.ids) for it in items)),
      mean_tokens=float(np.mean([len(it.ids) for it in items])),
      batches=len(plan.batches),
      buckets=list(plan.buckets),
  )
  return out


def _report(runs: list[dict]) -> str:
  r = runs[-1]
  lines = [
      f"Machine: {common.machine_description()}",
      "",
      f"Work: {r['records']:,} synthetic ShareGPT records (real ShareGPT lengths and words) × "
      f"K = 5 prompts = {r['texts']:,} texts, {r['tokens']:,} tokens (mean {r['mean_tokens']:.0f}; "
      f"{r['rejects']} rejected); SmolLM2 tokenizer; configs/smollm2_135m.py engine settings; "
      f"{r['batches']:,} batches, buckets {r['buckets']}.",
      "",
      "| code | read s | tokenize s | plan s | RSS after read / tokenize / plan MiB "
      "| tokenize − read, bytes a token | peak RSS MiB | load (1 min) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for x in runs:
    per_token = (x["rss_prepare"] - x["rss_read"]) * 2**20 / x["tokens"]
    lines.append(
        f"| {x['label']} | {x['read_s']:.0f} | {x['prepare_s']:.0f} | {x['plan_s']:.0f} | "
        f"{x['rss_read']:.0f} / {x['rss_prepare']:.0f} / {x['rss_plan']:.0f} | "
        f"{per_token:.1f} | {x['peak_rss']:.0f} | {x['load']:.1f} |"
    )
  lines += [
      "",
      "RSS includes the interpreter, jax/flax imports and the tokenizer; the peak is set "
      f"while the tokenizer is read from the GGUF ({r['rss_start']:.0f} MiB just after; "
      "that load's scratch memory is returned before reading), so at this size it hides the "
      "plan. Tokenize − read is what the planned token ids and work items hold, per token "
      "(tokenizer caches and allocator slack included). Seconds were taken on a shared "
      "machine (load column: the 1-minute load average at the end, on "
      f"{os.cpu_count()} cores).",
  ]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if _MEASURE.value:  # the child: its own process, so that its peak RSS is the planning's
    print("RESULT " + json.dumps(measure(_MEASURE.value)))
    return
  with tempfile.TemporaryDirectory(prefix="bench_plan_") as workdir:
    path = os.path.join(workdir, "records.jsonl")
    start = time.perf_counter()
    write_synthetic(path, _NUM_RECORDS.value, _SEED.value)
    print(f"[bench] {_NUM_RECORDS.value} records written in {time.perf_counter() - start:.0f}s")
    cmd = [sys.executable, os.path.abspath(__file__), f"--measure={path}"]
    cmd += [f"--config={_CONFIG.value}", f"--label={_LABEL.value}"]
    child = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
  result = json.loads(next(l for l in child.stdout.splitlines() if l.startswith("RESULT "))[7:])
  result["load"] = os.getloadavg()[0]
  print(json.dumps(result, indent=1))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(result, f)
  runs = [result]
  if _BASELINE.value:
    with open(_BASELINE.value) as f:
      runs.insert(0, json.load(f))
  text = _report(runs)
  print("\n" + text)
  if _OUTPUT.value:
    common.write_markdown(
        _OUTPUT.value,
        "bench_plan",
        "Host memory and time of planning (`python bench/bench_plan.py`)",
        text,
    )


if __name__ == "__main__":
  cli.run_main(main)
