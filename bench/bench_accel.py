r"""Scoring and training on an accelerator, random weights: our engine vs HF transformers + torch.

    PYTHONPATH=. python bench/bench_accel.py          # a GPU: 7B- and 1B-shaped, within 8 minutes
    PYTHONPATH=. python bench/bench_accel.py --shapes=tiny --num_texts=10 --seconds=0.2 \
        --max_tokens=128 --max_shapes=1 --nosubprocess  # CPU smoke test (tests/test_accel.py)
    PYTHONPATH=. python bench/bench_accel.py --write_lengths=bench/data/sharegpt_lengths.json
        # once, here (needs the venv's embedded ShareGPT and SmolLM2 packages)

Work: real ShareGPT text lengths (bench/data/sharegpt_lengths.json: the first usable records
of the embedded ShareGPT file, tokenized with SmolLM2's tokenizer in the released layout; per
record its own tokens, per released prompt its shared prefix, K = 5) filled with random token
ids, rated by models of the shape with random weights (no checkpoint travels):
  7b    LLaMA-2-7B (32 layers, d 4096, MHA, vocab 32000)
  1b    LLaMA-3.2-1B (16 layers, d 2048, GQA 32/8, vocab 128256, tied head)
  tiny  a 2-layer toy for CPU tests
Rows per shape, each over the same texts in the same shuffled order, each timed for --seconds
after its warm-up / compile (the mix of lengths is the same for all):
  ours            selectit_jax.scoring.engine.Scorer.rate (prefix cache, packing, buckets),
                  weights and matmuls in --dtype; compile = the prefixes' prefill + every bucket
  torch released  HF LlamaForCausalLM, batch 1, logits at every position, softmax at the last
                  (the released method; SDPA attention, transformers' default)
  torch careful   batches of length-sorted texts (sorted within windows of the shuffled order),
                  left padding with position ids, SDPA, logits_to_keep=1
  ours train      selectit_jax.training.step.make_train_step: packed rows, fp32 master weights,
                  --dtype compute, AdamW (skipped where 16 bytes per parameter exceed 60 %
                  of the device: the 7B shape on one 80 or 141 GB GPU)
Numbers: tokens/s (real tokens of the texts done), MFU = model FLOPs (models/costs.py:
forward_flops, 2·θ per token plus causal attention; train_flops_per_token for training) per
second over the device's dense bf16 peak (parallel/devices.py; '-' on CPU), HBM peak (jax's
memory_stats()['peak_bytes_in_use'], torch.cuda.max_memory_allocated()), compile seconds.

With --subprocess (the default) each (shape, row kind) runs in its own child process, so JAX's
preallocated pool and torch's caching allocator never share the GPU and each HBM peak is its
own; children that would start after --max_total_seconds are skipped with a line saying so.
--attention=auto,cudnn,xla gives our rows once per attention backend (the kernels side by
side; auto picks Pallas on a GPU). A child of ours whose kernel fails is run again with the jnp
attention, its row noting the error, so one borrowed run still has numbers.

Wheels the GPU machine needs: jax (CUDA), flax, optax (it brings absl-py), numpy, safetensors
and pyarrow (imported by our checkpoint and file modules; the GPU image has both); transformers
and torch for the torch rows (without them, or without CUDA when jax has a GPU, those rows are
skipped with a line saying why); this package from the repo root (PYTHONPATH=.). Not needed:
ml_collections, gguf, grain, orbax, scipy (imported only where a config file, checkpoint,
training data or score store is read). Checked in a fresh Python 3.12 venv holding only those
under jax 0.11.2 + flax 0.12.12 (CPU, Pallas in interpret mode): every backend's rows run.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selectit_jax import cli  # noqa: E402

LENGTHS_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "data", "sharegpt_lengths.json"
)

# LlamaConfig fields of each shape (dtype set by --dtype).
SHAPES = {
    "7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        rms_norm_eps=1e-5,
    ),
    # rope_scaling (llama3) left out: it changes no cost.
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
    ),
}
# Per shape: our engine's rows per step, the careful torch user's texts per batch, and the
# training step's packed rows × tokens.
ENGINE_BATCH = {"7b": 16, "1b": 32, "tiny": 2}
TORCH_BATCH = {"7b": 8, "1b": 16, "tiny": 4}
TRAIN_ROWS = {"7b": (4, 2048), "1b": (4, 2048), "tiny": (2, 64)}
RATING_IDS = (16, 17, 18, 19, 20)  # any five ids: random weights rate nothing

_SHAPES = flags.DEFINE_list("shapes", ["7b", "1b"], f"Model shapes: {', '.join(SHAPES)}.")
_NUM_TEXTS = flags.DEFINE_integer(
    "num_texts", 0, "Texts to plan (records × 5 prompts; 0 = every record in the lengths file)."
)
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Timed seconds per row (after its warm-up).")
_SKIP_TORCH = flags.DEFINE_bool("skip_torch", False, "Leave out the HF transformers + torch rows.")
_SKIP_TRAIN = flags.DEFINE_bool("skip_train", False, "Leave out the training-step rows.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Weights and matmuls (training: compute only).")
_ATTENTION = flags.DEFINE_list(
    "attention",
    ["auto"],
    "Our rows' engine.attention backends, a row each (auto: splash on TPU, Pallas on GPU, jnp "
    "on CPU; e.g. auto,cudnn,xla compares the kernels). With --subprocess, a child whose "
    "backend fails is run again with xla (unless xla is listed), its note saying why.",
)
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 2048, "Texts are cut to this many tokens.")
_MAX_SHAPES = flags.DEFINE_integer("max_shapes", 5, "Our engine's compiled row lengths.")
_SUBPROCESS = flags.DEFINE_bool("subprocess", True, "Each row kind and shape in its own process.")
_MAX_TOTAL = flags.DEFINE_float(
    "max_total_seconds",
    400.0,
    "Start no child after this many seconds of the run (the last one then ends by ~8 min).",
)
_OUTPUT = flags.DEFINE_string(
    "output", "", "Also write the table as its section of this markdown file (BENCHMARKS.md)."
)
_LENGTHS = flags.DEFINE_string("lengths", LENGTHS_FILE, "The text-lengths file.")
_WRITE_LENGTHS = flags.DEFINE_string(
    "write_lengths", "", "Tokenize the first --num_records usable records and write the file."
)
_NUM_RECORDS = flags.DEFINE_integer("num_records", 800, "With --write_lengths: records.")
_PART = flags.DEFINE_string("part", "", "Internal: a child's 'kind:shape'.")
_OUT = flags.DEFINE_string("out", "", "Internal: a child's result file.")


# ------------------------------------------------------------------------------------ work


def write_lengths(path: str, num_records: int) -> None:
  """The lengths file from the embedded data (run here, not on the GPU machine)."""
  from bench import common
  from selectit_jax.scoring import batching

  config = common.load_config("configs/smollm2_135m.py", [f"max_tokens={_MAX_TOKENS.value}"])
  work = common.bench_items(config, num_records, common.RELEASED_PROMPTS, 5)
  prefixes = [len(p) for p in batching.shared_prefixes(work["items"])]
  k = len(prefixes)
  body = [len(it.ids) - prefixes[it.prompt_index] for it in work["items"]]
  # The record's own tokens are the same under every prompt (the prefix ends at a token
  # boundary); checked, so the file can hold one number per record.
  per_record = [body[i : i + k] for i in range(0, len(body), k)]
  if any(len(set(b)) != 1 for b in per_record):
    raise ValueError("a record's own token count differs between prompts")
  data = dict(
      source="first usable records of the embedded ShareGPT file (data.turns=first), "
      f"SmolLM2-135M-Instruct's tokenizer, released prompts and layout, all {k} texts of a "
      f"record within {_MAX_TOKENS.value} tokens; a text = its prompt's shared prefix + the "
      "record's own tokens",
      max_tokens=_MAX_TOKENS.value,
      prefix_lengths=prefixes,
      record_lengths=[b[0] for b in per_record],
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, separators=(",", ":"))
    f.write("\n")
  print(f"wrote {path}: {len(per_record)} records, prefixes {prefixes}")


def texts(num_texts: int, vocab: int, max_tokens: int, seed: int = 0) -> list[tuple[int, list]]:
  """(prompt, random ids) with the file's lengths, records × prompts in a fixed shuffled
  order; each prompt's prefix ids are shared by its texts, each record's own ids by its K
  texts, as in real work."""
  import numpy as np

  with open(_LENGTHS.value) as f:
    data = json.load(f)
  prefixes, records = data["prefix_lengths"], data["record_lengths"]
  k = len(prefixes)
  n = len(records) * k if num_texts <= 0 else num_texts
  rng = np.random.default_rng(seed)
  prefix_ids = [rng.integers(1, vocab, p).tolist() for p in prefixes]  # 0 is the pad id
  out = []
  for i in range(math.ceil(n / k)):
    own = rng.integers(1, vocab, records[i % len(records)]).tolist()
    out += [(j, (prefix_ids[j] + own)[:max_tokens]) for j in range(k)]
  return [out[i] for i in rng.permutation(len(out))[:n]]


def model_config(shape: str, dtype: str, param_dtype: str | None = None, attention="auto"):
  from selectit_jax.models.llama import LlamaConfig

  return LlamaConfig(
      **SHAPES[shape], dtype=dtype, param_dtype=param_dtype or dtype, attention=attention
  )


def _attention(cfg) -> str:
  """The backend `cfg.attention` runs on this platform (auto resolved)."""
  from selectit_jax.models import attention

  return attention.resolve(cfg.attention)


def random_params(cfg, mesh, seed: int = 0):
  """The model's own initialisers, run under jit straight into the mesh's shardings
  (param_shapes' abstract tree gives them; nothing is materialised on the host)."""
  import flax.linen as nn
  import jax
  from selectit_jax import checkpoints
  from selectit_jax.models import registry
  from selectit_jax.parallel import sharding

  shardings = sharding.param_shardings(checkpoints.param_shapes(cfg)["params"], mesh)
  model = registry.build(cfg)

  def init(key):
    tokens = jax.numpy.zeros((1, 1), jax.numpy.int32)
    return nn.unbox(model.init(key, tokens, tokens, tokens + 1))["params"]

  with sharding.activate(mesh):
    params = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))
  return jax.block_until_ready(params)


def _jax_device():
  import jax

  d = jax.devices()[0]
  return d, f"{jax.device_count()} × {d.device_kind} ({d.platform}), jax {jax.__version__}"


def _hbm_peak() -> float | None:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _mfu(flops_per_s: float, device_kind: str, num_devices: int = 1) -> float | None:
  from selectit_jax.parallel import devices

  peak = devices.peak_flops(device_kind)
  return flops_per_s / (peak * num_devices) if peak else None


# ------------------------------------------------------------------------------------ rows


def part_ours(shape: str, attention: str) -> dict:
  """Our engine over the plan of the texts, batches in a fixed shuffled order, time-boxed."""
  import numpy as np
  import jax
  from bench import common
  from selectit_jax.models import costs
  from selectit_jax.parallel import sharding
  from selectit_jax.scoring import batching

  device, desc = _jax_device()
  cfg = model_config(shape, _DTYPE.value, attention=attention)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  start = time.perf_counter()
  params = random_params(cfg, mesh)
  init_s = time.perf_counter() - start
  work = texts(_NUM_TEXTS.value, cfg.vocab_size, _MAX_TOKENS.value)
  items = [
      batching.WorkItem(i, str(i), f"c{i}", k, f"p{k}", tuple(ids))
      for i, (k, ids) in enumerate(work)
  ]
  batch = sharding.effective_batch_size(ENGINE_BATCH[shape], dict(mesh.shape))
  engine_cfg = types.SimpleNamespace(
      batch_size=batch,
      max_tokens=_MAX_TOKENS.value,
      max_shapes=_MAX_SHAPES.value,
      bucket_multiple=16,
      prefix_cache=True,
      max_segments=8,
      fit_buckets=True,
  )
  scorer, plan, compile_s = common.compiled_scorer(
      types.SimpleNamespace(engine=engine_cfg),
      types.SimpleNamespace(config=cfg, params=params),
      mesh,
      items,
      np.asarray(RATING_IDS),
      pad_id=0,
  )
  batches = list(plan.batches)
  np.random.default_rng(1).shuffle(batches)  # a time box then sees the whole mix of lengths
  lengths, steps = [], 0
  start = time.perf_counter()
  for rated in scorer.rate(batches):
    lengths += [len(it.ids) for it in rated.batch.items]
    steps += 1
    if time.perf_counter() - start >= _SECONDS.value:
      break
  seconds = time.perf_counter() - start
  flops = costs.forward_flops(cfg, lengths, costs.num_params(cfg))
  row = dict(
      method=f"ours ({cfg.dtype}, batch {batch}, prefix cache + packing, "
      f"{len(plan.buckets)} shapes, attention {_attention(cfg)})",
      attention=_attention(cfg),
      device=desc,
      tokens_s=sum(lengths) / seconds,
      mfu=_mfu(flops / seconds, device.device_kind, jax.device_count()),
      hbm=_hbm_peak(),
      compile_s=compile_s,
      texts=len(lengths),
      note=f"{steps} steps; random init {init_s:.1f} s; buckets {plan.buckets}",
  )
  return dict(rows=[row])


def _torch_skip_reason() -> str | None:
  """Why the torch rows cannot run here, or None: torch or transformers missing, or a
  CPU-only torch where jax has a GPU (a 7B model on the host would say nothing)."""
  try:
    import torch
    import transformers
  except ImportError as e:
    return f"torch rows skipped: {e}"
  del transformers
  if torch.cuda.is_available():
    return None
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # only asking the platform
  import jax

  if jax.devices()[0].platform != "cpu":
    return f"torch rows skipped: torch {torch.__version__} has no CUDA device here"
  return None


def part_torch(shape: str, attention: str) -> dict:
  """HF LlamaForCausalLM with random bf16 weights of the shape: the released method (batch
  1, full logits) and a careful user's batches (SDPA, logits_to_keep=1)."""
  del attention  # transformers' own SDPA
  why = _torch_skip_reason()
  if why:
    return dict(skipped=why)
  import torch
  import transformers
  from selectit_jax.models import costs

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, _DTYPE.value)
  cfg = model_config(shape, _DTYPE.value)
  hf = cfg.to_hf()
  hf.pop("torch_dtype", None)
  hf_config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
  start = time.perf_counter()
  torch.set_default_dtype(dtype)
  try:
    with torch.device(dev):
      model = transformers.LlamaForCausalLM(hf_config).eval()
  finally:
    torch.set_default_dtype(torch.float32)
  init_s = time.perf_counter() - start
  kind = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
  desc = f"{kind}, torch {torch.__version__}, transformers {transformers.__version__}"
  rating = torch.as_tensor(RATING_IDS, device=dev)
  work = [ids for _, ids in texts(_NUM_TEXTS.value, cfg.vocab_size, _MAX_TOKENS.value)]
  theta = costs.num_params(cfg)

  def released(ids):
    logits = model(input_ids=torch.tensor([ids], device=dev)).logits  # [1, L, vocab]
    return torch.softmax(logits[0, -1].float(), dim=-1)[rating].cpu()  # the host reads it

  def careful(group):
    b, length = len(group), max(len(t) for t in group)
    ids = torch.zeros((b, length), dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    for r, t in enumerate(group):  # left padding: every text ends at the last position
      ids[r, length - len(t) :] = torch.tensor(t)
      mask[r, length - len(t) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev))
    inputs.update(position_ids=positions.to(dev))
    try:
      logits = model(**inputs, logits_to_keep=1).logits[:, -1]
    except TypeError:  # transformers < 4.50 named it num_logits_to_keep
      logits = model(**inputs, num_logits_to_keep=1).logits[:, -1]
    return torch.softmax(logits.float(), dim=-1)[:, rating].cpu()

  b = TORCH_BATCH[shape]
  groups = []
  for w in range(0, len(work), 8 * b):  # length-sorted within windows of the shuffled order
    window = sorted(work[w : w + 8 * b], key=len)
    groups += [window[i : i + b] for i in range(0, len(window), b)]
  rows = []
  for name, fn, units in (
      ("torch released (batch 1, full logits)", released, [[t] for t in work]),
      (f"torch careful (batch {b}, SDPA, logits_to_keep=1)", careful, groups),
  ):
    if dev == "cuda":
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
      start = time.perf_counter()
      fn(units[0] if fn is careful else units[0][0])  # warm-up (allocator, kernels)
      warm_s = time.perf_counter() - start
      lengths = []
      start = time.perf_counter()
      for unit in units[1:]:
        fn(unit if fn is careful else unit[0])
        lengths += [len(t) for t in unit]
        if time.perf_counter() - start >= _SECONDS.value:
          break
      seconds = time.perf_counter() - start
    flops = costs.forward_flops(cfg, lengths, theta)
    rows.append(
        dict(
            method=name,
            device=desc,
            tokens_s=sum(lengths) / seconds,
            mfu=_mfu(flops / seconds, kind),
            hbm=torch.cuda.max_memory_allocated() if dev == "cuda" else None,
            compile_s=None,
            texts=len(lengths),
            note=f"warm-up {warm_s:.1f} s; random init {init_s:.1f} s",
        )
    )
  return dict(rows=rows)


def part_train(shape: str, attention: str) -> dict:
  """Our training step (public step functions only) on packed rows of the texts."""
  import numpy as np
  import jax
  from selectit_jax.parallel import devices
  from selectit_jax.parallel import sharding
  from selectit_jax.models import costs
  from selectit_jax.training import perf
  from selectit_jax.training import step as step_lib

  device, desc = _jax_device()
  cfg = model_config(shape, _DTYPE.value, "float32", attention)
  need = 16 * costs.num_params(cfg)  # fp32 master weights, gradients, two AdamW moments
  name = devices.detect(device)
  cap, _ = devices.capacity(name, jax.local_device_count())
  if need > 0.6 * cap * jax.device_count():  # the rest: activations (no remat), workspace
    return dict(
        skipped=f"{shape} training step skipped: fp32 master weights, gradients and AdamW "
        f"moments need {need / 2**30:.0f} GiB, more than 60 % of {jax.device_count()} × "
        f"{cap / 2**30:.0f} GiB ({name}), which activations need the rest of"
    )
  rows, length = TRAIN_ROWS[shape]
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rows = sharding.effective_batch_size(rows, dict(mesh.shape))
  train_cfg = types.SimpleNamespace(
      learning_rate=2e-5,
      warmup_ratio=0.03,
      schedule="cosine",
      max_grad_norm=1.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
  )
  sched = step_lib.schedule(train_cfg, 1000)
  tx = step_lib.optimizer(train_cfg, sched)
  shardings = step_lib.state_shardings(cfg, tx, mesh)
  state = step_lib.init_state(random_params(cfg, mesh), tx, shardings)
  train_step = step_lib.make_train_step(cfg, tx, sched, mesh, shardings)
  # Enough texts to fill the rows (≥ 64 tokens each, prefixes included).
  batch = _packed_rows(texts(rows * length // 64 + 5, cfg.vocab_size, length + 1), rows, length)
  batch = jax.device_put(
      {k: v[None] for k, v in batch.items()}, step_lib.accumulation_sharding(mesh)
  )
  start = time.perf_counter()
  state, metrics = train_step(state, batch)
  loss = float(jax.block_until_ready(metrics["loss"]))
  compile_s = time.perf_counter() - start
  times = []
  while not times or (sum(times) < _SECONDS.value and len(times) < 1000):
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  tokens_s = float(batch["weights"].size) / step_s
  peak = devices.peak_flops(device.device_kind)  # None on CPU: no MFU
  return dict(
      rows=[
          dict(
              method=f"ours train step ({cfg.dtype} compute, fp32 master, AdamW, "
              f"{rows} × {length} packed, attention {_attention(cfg)})",
              attention=_attention(cfg),
              device=desc,
              tokens_s=tokens_s,
              mfu=perf.mfu(tokens_s, cfg, length, peak, jax.device_count()) if peak else None,
              hbm=_hbm_peak(),
              compile_s=compile_s,
              texts=None,
              note=f"median of {len(times)} steps; first loss {loss:.2f}",
          )
      ]
  )


def _packed_rows(work, rows: int, length: int) -> dict:
  """Texts laid end to end into rows of `length` (one segment each, every token a target;
  a text that does not fit a row's rest starts the next row)."""
  import numpy as np

  keys = ("inputs", "targets", "weights", "positions", "segment_ids")
  out = {k: np.zeros((rows, length), np.float32 if k == "weights" else np.int32) for k in keys}
  r, col, seg = 0, 0, 1
  for _, ids in work:
    ids = ids[: length + 1]
    n = len(ids) - 1
    if col + n > length:
      r, col, seg = r + 1, 0, 1
    if r == rows:
      break
    sl = slice(col, col + n)
    out["inputs"][r, sl], out["targets"][r, sl] = ids[:-1], ids[1:]
    out["weights"][r, sl] = 1.0
    out["positions"][r, sl] = np.arange(n)
    out["segment_ids"][r, sl] = seg
    col, seg = col + n, seg + 1
  return out


PARTS = {"ours": part_ours, "torch": part_torch, "train": part_train}


# ---------------------------------------------------------------------------------- parent


def _child(kind: str, shape: str, attention: str) -> tuple[dict | None, str]:
  """One row kind in its own process: (its result or None, why not). Its stderr streams
  through as it runs (a hung child still shows how far it got)."""
  with tempfile.TemporaryDirectory(prefix="bench_accel_") as tmp:
    out = os.path.join(tmp, "out.json")
    argv = [a for a in sys.argv[1:] if not a.startswith(("--part", "--out"))]
    cmd = [sys.executable, os.path.abspath(__file__), *argv]
    cmd += [f"--part={kind}:{shape}:{attention}", f"--out={out}"]
    error = ""
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
      for line in proc.stderr:
        sys.stderr.write(line)
        # The exception's own line (JAX appends a note on filtered frames after it), or the
        # `error:` line a user's mistake ends with (cli.run_main: exit status 2).
        if re.match(r"error: |[A-Za-z_][\w.]*(Error|Exception)\b", line):
          error = line.strip()
    if proc.returncode or not os.path.exists(out):
      return None, f"exit {proc.returncode}: {error[:300]}"
    with open(out) as f:
      return json.load(f), ""


def _run_part(kind: str, shape: str, attention: str) -> dict:
  """A row kind's result; in a child process by default. A kernel backend that fails there
  costs one rerun with the jnp attention, so one run on a borrowed GPU still gives numbers."""
  if not _SUBPROCESS.value:
    return PARTS[kind](shape, attention)
  result, why = _child(kind, shape, attention)
  if result is not None:
    return result
  if kind in ("ours", "train") and "xla" not in _ATTENTION.value:
    print(f"[bench_accel] {shape}: {kind} failed ({why}); again with attention xla", flush=True)
    result, why_xla = _child(kind, shape, "xla")
    if result is not None:
      for row in result["rows"]:
        row["note"] += f"; --attention={attention} failed ({why}), rerun with xla"
      return result
    why += f"; with attention xla: {why_xla}"
  return dict(skipped=f"{kind} {shape} (attention {attention}): the child failed ({why})")


def _fmt(x, spec: str, scale: float = 1.0) -> str:
  return "-" if x is None else format(x / scale if scale != 1.0 else x, spec)


def table(results: list[tuple[str, dict]]) -> str:
  lines = [
      "| shape | method | tokens/s | MFU | HBM peak GiB | compile s | texts | notes |",
      "|---|---|---|---|---|---|---|---|",
  ]
  notes, devices_seen = [], []
  by_shape: dict = {}
  for shape, r in results:
    if "skipped" in r:
      notes.append(f"- {shape}: {r['skipped']}")
      continue
    for row in r["rows"]:
      rows = by_shape.setdefault(shape, {}).setdefault(row["method"].split(" (")[0], [])
      rows.append((row.get("attention"), row["tokens_s"]))
      if row["device"] not in devices_seen:
        devices_seen.append(row["device"])
      lines.append(
          f"| {shape} | {row['method']} | {row['tokens_s']:.0f} | {_fmt(row['mfu'], '.1%')} | "
          f"{_fmt(row['hbm'], '.1f', 2**30)} | {_fmt(row['compile_s'], '.1f')} | "
          f"{_fmt(row['texts'], 'd')} | {row['note']} |"
      )
  for shape, t in by_shape.items():
    if "ours" in t and "torch careful" in t:
      (_, careful), (_, released) = t["torch careful"][0], t["torch released"][0]
      for backend, ours in t["ours"]:
        notes.append(
            f"- {shape}: ours (attention {backend}) = {ours / careful:.1f}× torch careful, "
            f"{ours / released:.1f}× torch released"
        )
  head = [f"Devices: {'; '.join(devices_seen)}"]
  return "\n".join(head + [""] + lines + [""] + notes) + "\n"


def main(argv):
  del argv
  if _WRITE_LENGTHS.value:
    write_lengths(_WRITE_LENGTHS.value, _NUM_RECORDS.value)
    return
  if _PART.value:
    kind, shape, attention = _PART.value.split(":")
    with open(_OUT.value, "w") as f:
      json.dump(PARTS[kind](shape, attention), f)
    return
  unknown = [s for s in _SHAPES.value if s not in SHAPES]
  if unknown:
    raise app.UsageError(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
  from selectit_jax.models import attention  # pylint: disable=g-import-not-at-top

  unknown = [a for a in _ATTENTION.value if a not in attention.BACKENDS]
  if unknown or not _ATTENTION.value:
    raise app.UsageError(f"--attention={unknown}; known: {', '.join(attention.BACKENDS)}")
  start = time.perf_counter()
  results = []
  for shape in _SHAPES.value:
    kinds = ["ours"] + ["torch"] * (not _SKIP_TORCH.value) + ["train"] * (not _SKIP_TRAIN.value)
    runs = [(k, a) for k in kinds for a in (_ATTENTION.value if k != "torch" else ["-"])]
    for kind, backend in runs:
      if time.perf_counter() - start > _MAX_TOTAL.value:
        why = f"{kind} (attention {backend}): not started, past --max_total_seconds"
        results.append((shape, dict(skipped=why)))
        continue
      print(f"[bench_accel] {shape}: {kind} (attention {backend}) ...", flush=True)
      results.append((shape, _run_part(kind, shape, backend)))
  text = table(results) + f"\nWall time of the whole run: {time.perf_counter() - start:.0f} s.\n"
  print("\n" + text)
  if _OUTPUT.value:
    from bench import common

    command = " ".join(["python bench/bench_accel.py", *sys.argv[1:]])
    common.write_markdown(_OUTPUT.value, "bench_accel", f"Accelerators (`{command}`)", text)


if __name__ == "__main__":
  cli.run_main(main)
