"""Benchmark: a ~1,000-setting sweep over synthetic stored probabilities.

python bench/bench_sweep.py [--samples 100000] [--models 1] [--prompts 5]

Writes an Alpaca JSONL file and one score dir per model (ScoreStore, as the
scorer writes them) in a temp dir, then times selectit_jax.sweeps.runner.run: loading
(Parquet + records + alignment), the sweep itself, and the written outputs.
Prints the timings; saves nothing in the repo.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from configs import sweep as sweep_config
from selectit_jax.data import prompts as prompts_lib
from selectit_jax.data import records as records_lib
from selectit_jax.scoring import manifest as manifest_lib
from selectit_jax.scoring import store as store_lib
from selectit_jax.sweeps import runner as sweep_runner  # noqa: E402


def make_data(tmp: str, n: int, k: int, num_models: int, seed: int = 0) -> list:
  rng = np.random.default_rng(seed)
  data = os.path.join(tmp, "data.jsonl")
  ins_len = rng.integers(5, 400, n)
  res_len = rng.integers(5, 2000, n)
  with open(data, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(
          json.dumps(
              {
                  "instruction": f"q{i} " + "x" * int(ins_len[i]),
                  "input": "",
                  "output": f"a{i} " + "y" * int(res_len[i]),
              }
          )
          + "\n"
      )
  recs, _, _ = records_lib.read_records({"path": data, "format": "alpaca"})
  hashes = [records_lib.content_hash(r) for r in recs]
  prompts = prompts_lib.default_prompts()[:k]
  phash = [prompts_lib.prompt_hash(p) for p in prompts]
  dirs = []
  base = rng.gamma(0.7, size=(n, 1, 5))  # shared per sample: models agree somewhat
  for j in range(num_models):
    name = f"m{j}"
    d = os.path.join(tmp, name)
    st = store_lib.ScoreStore(d)
    nparams = [135_000_000, 360_000_000, 1_700_000_000][j % 3]
    st.write_manifest(
        manifest_lib.Manifest(
            data={"path": data, "format": "alpaca"},
            template=prompts_lib.DEFAULT_TEMPLATE,
            prompts=dict(zip(phash, prompts)),
            models=[manifest_lib.ModelEntry(name, name, "", "", nparams)],
            runs=[manifest_lib.RunEntry(name, tuple(phash), 0, n)],
        )
    )
    p = base + rng.gamma(0.7, size=(n, k, 5))
    p = p / p.sum(-1, keepdims=True) * rng.uniform(0.05, 0.9, size=(n, k, 1))
    for lo in range(0, n, 20000):
      rows = [
          dict(
              sample_id=recs[i].id,
              sample_index=recs[i].index,
              content_hash=hashes[i],
              model=name,
              num_params=nparams,
              prompt_index=q,
              prompt_hash=phash[q],
              probs=p[i, q].tolist(),
              logsumexp=0.0,
              num_tokens=100,
          )
          for i in range(lo, min(n, lo + 20000))
          for q in range(k)
      ]
      st.write_shard(rows)
    dirs.append(d)
  return dirs


def grid_config(num_models: int, k: int):
  """About 1,000 settings."""
  c = sweep_config.get_config()
  c.modes = "paper,code"
  c.prompt_subsets = "first"
  if num_models == 1:
    # 2 modes x (k token + k subsets x 9 alphas) x 10 proportions = 1,000 at k = 5
    c.levels = "token,sentence"
    c.alphas = "0,0.1,0.2,0.3,0.5,0.75,1,1.5,2"
    c.proportions = "0.02,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.7"
  else:
    # 2 modes x k subsets x 10 alphas x 2 weights x 5 proportions = 1,000 at k = 5
    c.levels = "model"
    c.alphas = "0,0.1,0.2,0.3,0.5,0.75,1,1.5,2,3"
    c.weights = "theta;uniform"
    c.proportions = "0.05,0.1,0.2,0.3,0.5"
  return c


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--samples", type=int, default=100_000)
  ap.add_argument("--models", type=int, default=1)
  ap.add_argument("--prompts", type=int, default=5)
  ap.add_argument("--kendall_max_samples", type=int, default=20000)
  ap.add_argument("--plots", type=int, default=1)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    t = time.time()
    dirs = make_data(tmp, args.samples, args.prompts, args.models)
    print(f"setup (not timed): {time.time() - t:.1f} s")
    c = grid_config(args.models, args.prompts)
    c.scores_dir = ",".join(dirs)
    c.output_dir = os.path.join(tmp, "out")
    c.kendall_max_samples = args.kendall_max_samples
    c.plots = bool(args.plots)
    t = time.time()
    summary = sweep_runner.run(c)
    wall = time.time() - t
    tm = summary["timing"]
    print(
        f"samples={summary['num_samples']} models={len(summary['models'])} "
        f"K={summary['num_prompts']} settings={tm['settings']} "
        f"score_vectors={tm['score_vectors']} kendall_max={args.kendall_max_samples}"
    )
    print(
        f"wall {wall:.2f} s: load {tm['load_s']:.2f} s, sweep {tm['total_s']:.2f} s "
        f"(scores {tm['scores_s']:.2f}, rank {tm['rank_s']:.2f}, "
        f"metrics {tm['metrics_s']:.2f}), outputs {wall - tm['load_s'] - tm['total_s']:.2f} s"
    )


if __name__ == "__main__":
  main()
