"""Sweep config: many selection settings over stored rating probabilities.

python -m selectit_jax.sweep --config=configs/sweep.py \
  --config.scores_dir=DIR[,DIR2,...] --config.output_dir=OUT

Every list is a string (so it can be overridden on the command line) or a
Python list. The grid is the product of the axes that apply to each level:
  token:    mode x model x prompt index (token_prompts)          x cuts
  sentence: mode x model x prompt subset x alpha                 x cuts
  model:    mode x prompt subset x alpha x weights (M > 1 only)  x cuts
cuts = proportions (top_n 0) + top_ns. One setting = exactly what
selectit_jax.select does with the same mode/level/alpha/k/prompt_index/
proportion/top_n/weights.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.scores_dir = ""  # one dir, or comma-separated dirs of several models
  c.output_dir = ""
  c.k = 0  # 0 = all stored prompts, else only the first k exist
  c.modes = "paper,code"
  c.levels = "token,sentence,model"  # model level only runs with several models
  c.alphas = "0,0.1,0.2,0.3,0.5,1.0"
  # ';'-separated specs: 'all' | 'first' (first k for k = 1..K) | 'first:1,3'
  # (first k for each listed k) | 'all_k:3' (every 3-subset of the K prompts) |
  # 'set:0,2,4' (one explicit subset).
  c.prompt_subsets = "first"
  c.token_prompts = ""  # prompt indices for token level; '' = all K
  c.proportions = "0.05,0.1,0.2,0.3,0.5"
  c.top_ns = ""  # e.g. '1000,6000'; each adds a setting with top_n
  # ';'-separated: 'theta' (Eq. 5, parameter counts) | 'uniform' | 'w1,w2,..'
  # (fractions allowed, e.g. '7/20,13/20,70/90').
  c.weights = "theta;uniform"

  # The reference every setting is compared with (Jaccard, Spearman, Kendall).
  c.default = ml_collections.ConfigDict(
      dict(
          mode="paper",
          level="auto",  # auto = 'model' with several models, else 'sentence'
          model="",  # token/sentence level: '' = the first model
          prompts="all",  # one subset spec ('all', 'first:3', 'set:0,1')
          prompt_index=0,  # token level
          alpha=0.2,
          proportion=0.2,
          top_n=0,
          weights="theta",
      )
  )

  # Kendall's tau-b per score vector on at most this many samples (a fixed
  # random subsample, seed below); 0 = all. scipy's O(n log n) tau costs ~40 ms
  # at 100k, so 1,000 distinct score vectors would take 40 s on their own.
  c.kendall_max_samples = 20000
  c.seed = 0
  c.block_elements = 1 << 24  # cap on floats per vectorised score block
  c.write_selections = False  # selections.parquet: selected sample indices per setting
  c.plots = True
  c.max_table_rows = 2000  # rows of the full table in sweep.md (Parquet has all)
  return c
