"""A study: one base model fine-tuned on each arm's records of one scored pool, each tuned
model evaluated on the same benchmark items (selectit_jax/studies/).

    python -m selectit_jax.study --config=configs/study.py --config.scores_dir=SCORES \
        --config.output_dir=DIR [--config.arms=base,selectit,random,longest,full]

The paper tunes a base model; the trainer's model section names it (default: the embedded
SmolLM2-135M-Instruct; Gemma 3 270M base: --config.train.model.embedded=gemma3_270m).
"""

import ml_collections

from configs import eval as eval_config
from configs import select as select_config
from configs import train_smollm2_135m


def get_config():
  c = ml_collections.ConfigDict()
  c.scores_dir = ""  # the scored pool (comma list: several raters, for selectit_model)
  # How SelectIT ranks the pool (mode, alpha, proportion, k, weights); every arm but 'full'
  # keeps floor(N · proportion) of the N rankable records.
  c.select = select_config.get_config()
  del c.select["scores_dir"], c.select["output_dir"]
  # base (no training) | selectit (sentence level; model level with several raters) |
  # selectit_model | random (one arm per seed) | longest (longest responses) | full (the pool)
  c.arms = "base,selectit,random,longest"
  c.seeds = "0,1,2"  # random arms
  c.train = train_smollm2_135m.get_config()  # its model section is the base model
  c.eval = eval_config.get_config()
  c.eval.tasks = "arc_easy,arc_challenge,mmlu"
  c.eval.limit = 0
  c.output_dir = ""
  return c
