"""A study: one base model fine-tuned on each arm's records of one scored pool, each tuned
model evaluated on the same benchmark items (selectit_jax/studies/).

    python -m selectit_jax.study --config=configs/study.py --config.scores_dir=SCORES \
        --config.output_dir=DIR [--config.arms=base,selectit,random,longest,full]

The paper tunes a base model; the trainer's model section names it (default: the embedded
SmolLM2-135M-Instruct; Gemma 3 270M base: --config.train.model.embedded=gemma3_270m). The
optional arg names another training config for that section, with its own arg (a slice):

    python -m selectit_jax.study --config=configs/study.py:train_llama2_7b:v5p-8 \
        --config.train.model.path=gs://bkt/llama-2-7b-hf --config.scores_dir=… --config.output_dir=…
"""

import importlib

import ml_collections

from configs import eval as eval_config
from configs import select as select_config


def get_config(arg=None):
  train_name, _, train_arg = (arg or "train_smollm2_135m").partition(":")
  try:
    train_module = importlib.import_module(f"configs.{train_name}")
  except ModuleNotFoundError:
    raise ValueError(
        f"configs/study.py:{arg}: no training config configs/{train_name}.py"
    ) from None
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
  # Its model section is the base model (arg: another training config, e.g. train_llama2_7b:v5p-8).
  c.train = train_module.get_config(*([train_arg] if train_arg else []))
  # Once an arm's model is exported its training checkpoints (optimizer state: 16 bytes a
  # parameter, ~100 GB for a 7B arm) are deleted; True keeps them.
  c.keep_checkpoints = False
  c.eval = eval_config.get_config()
  c.eval.tasks = "arc_easy,arc_challenge,mmlu"
  c.eval.limit = 0
  c.output_dir = ""
  return c
