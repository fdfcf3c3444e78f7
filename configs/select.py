"""Selection config: rank stored rating probabilities and keep the best samples.

python -m selectit_jax.select --config=configs/select.py \
  --config.scores_dir=DIR --config.mode=paper --config.level=sentence \
  --config.alpha=0.2 --config.proportion=0.2 --config.output_dir=OUT
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # Score store directory; a comma-separated list combines several models
  # (level='model'). No model is loaded here.
  c.scores_dir = ""
  c.mode = "paper"  # 'paper' (Eq. 2-5) or 'code' (released scripts).
  c.level = "sentence"  # 'token' | 'sentence' | 'model'.
  c.alpha = 0.2  # Eq. 4 uncertainty weight.
  c.prompt_index = 0  # Prompt used at token level.
  c.k = 0  # 0 = all stored prompts, else the first k.
  c.proportion = 0.2  # Fraction kept: floor(N * proportion).
  # N: 'rankable' = samples with usable scores (default); 'input' = all input samples,
  # unrankable ones (rejected while scoring, missing or bad scores) included.
  c.count_from = "rankable"
  c.top_n = 0  # > 0 overrides proportion.
  c.weights = ""  # '' = theta (parameter counts); 'uniform'; 'w1,w2,..'.
  # Rank even if some input records lack rows the scorer did not reject them for (a killed
  # or partial run): they are reported as missing. False: refuse, naming the coverage.
  c.allow_partial = False
  c.output_dir = ""
  return c
