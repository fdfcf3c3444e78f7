"""Tiny fine-tuning config for tests: set model.path to a tiny HF checkpoint directory."""

from configs import train_smollm2_135m


def get_config():
  c = train_smollm2_135m.get_config()
  c.data.max_length = 64
  # Short prompt: the test tokenizer is tiny (byte fallback), the default one is ~100 tokens.
  c.data.alpaca_prompt = "Instruction: {instruction}\nResponse: "
  c.data.val_fraction = 0.2
  c.train.learning_rate = 1e-3
  c.train.epochs = 2
  c.train.batch_size = 8  # examples a step
  c.train.micro_batch_size = 2  # rows
  c.train.eval_every = 5
  c.train.peak_flops_per_device = 1e11
  c.checkpoint.every = 5
  c.export.enabled = False
  return c
