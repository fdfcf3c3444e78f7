r"""Scoring throughput: the reference loop vs our engine vs this machine's matmul roofline.

    python bench/bench_score.py                      # the documented setting: 64 records (~10 min on 2 cores)
    python bench/bench_score.py --num_records=16     # a quicker look (~3 min)

In one process tree, on the same token ids (first `num_records` usable ShareGPT records ×
K prompts, the released layout), each part in its own child process so that peak RSS is its own:
  1. reference: HF transformers + torch fp32, batch 1, logits at every position, softmax over
     the full vocabulary at the last one (what the released code does, on CPU);
  2. ours: selectit_jax.scoring.engine with the config's engine settings (configs/smollm2_135m.py);
  3. roofline: a jit'd large fp32 matmul.
Checks max |Δp| ≤ --tolerance between 1 and 2, prints the table and writes BENCHMARKS.md
(--output). Reference and ours alternate `--repeats` times; the table keeps each one's best
steady run (the machine is shared, so noise only ever slows a run down). Tokenization is done
once by the parent, timed, and left out of both throughputs. FLOPs: see bench/common.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selectit_jax import cli  # noqa: E402
from bench import common  # noqa: E402
from selectit_jax.models import costs  # noqa: E402
from selectit_jax.parallel import devices  # noqa: E402

_NUM_RECORDS = flags.DEFINE_integer(
    "num_records", 64, "First N usable ShareGPT records (all K texts ≤ max_tokens)."
)
_K = flags.DEFINE_integer("k", 5, "Rating prompts per record.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file",
    common.RELEASED_PROMPTS,
    "Prompt file (released layout); '' = our own default prompts with the same template.",
)
_CONFIG = flags.DEFINE_string(
    "config", "configs/smollm2_135m.py", "Scoring config (model, engine)."
)
_OVERRIDES = flags.DEFINE_list(
    "engine",
    [],
    "Config overrides for ours: engine keys or section.key, e.g. batch_size=1,model.dtype=bfloat16.",
)
_REPEATS = flags.DEFINE_integer("repeats", 1, "Alternating reference/ours runs; the best is kept.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "Max |Δp| allowed between reference and ours.")
_OUTPUT = flags.DEFINE_string("output", "BENCHMARKS.md", "Markdown report ('' = none).")
_SKIP_REFERENCE = flags.DEFINE_bool(
    "skip_reference", False, "Only ours and the roofline (lever trials)."
)
_TRAIN = flags.DEFINE_bool(
    "train",
    True,
    "Also time training steps: our trainer's jit'd step vs "
    "a plain HF+torch AdamW step on the same packed batch.",
)
_TRAIN_ROWS = flags.DEFINE_integer("train_rows", 4, "Packed rows per training step.")
_TRAIN_LENGTH = flags.DEFINE_integer("train_length", 512, "Tokens per packed row.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3, "Timed training steps (after one warm-up).")
_PART = flags.DEFINE_enum(
    "part",
    "main",
    ["main", "reference", "ours", "roofline", "train_reference", "train_ours"],
    "Internal: the child process's part.",
)
_TRAIN_CONFIG = "configs/train_smollm2_135m.py"  # the training rows: its template and loss mask
_WORKDIR = flags.DEFINE_string("workdir", "", "Internal: the parent's scratch directory.")
_RATERS = flags.DEFINE_list(
    "raters",
    [],
    "Configs to bench side by side instead (ours only, the same records for each: the first "
    "num_records usable by every model), e.g. configs/smollm2_135m.py,configs/gemma3_270m.py.",
)


# ---------------------------------------------------------------------------------- parent


def _load_config():
  return common.load_config(_CONFIG.value, _OVERRIDES.value)


def _prepare(workdir: str, samples=None, hf_copy: bool = True, train: bool = False) -> dict:
  """Tokenizes the bench texts once (of `samples` only, when given); writes the ids,
  with `train` the training rows of the same records, and with `hf_copy` an HF copy of the
  same weights (the reference's)."""
  from selectit_jax import checkpoints
  from selectit_jax.checkpoints import hf

  config = _load_config()
  work = common.bench_items(config, _NUM_RECORDS.value, _PROMPTS_FILE.value, _K.value, samples)
  model_path = work["model_path"]
  model = checkpoints.load_model(model_path)
  if hf_copy:
    hf.save_hf(os.path.join(workdir, "hf"), model.config, model.params)
  data = dict(
      model_name=config.model.name,
      items=work["items"],
      rating_ids=work["rating_ids"],
      model_path=model_path,
      pad_id=work["tokenizer"].pad_id,
      num_params=model.num_params,
      cfg=model.config,
      tokenize_s=work["tokenize_s"],
      num_records=work["num_records"],
      prompts_file=_PROMPTS_FILE.value or "(our default prompts)",
      train_rows=_train_rows(work["records"], work["tokenizer"]) if train else None,
  )
  with open(os.path.join(workdir, "data.pkl"), "wb") as f:
    pickle.dump(data, f)
  return data


def _child(part: str, workdir: str) -> dict:
  cmd = [
      sys.executable,
      os.path.abspath(__file__),
      f"--part={part}",
      f"--workdir={workdir}",
      f"--config={_CONFIG.value}",
      f"--train_rows={_TRAIN_ROWS.value}",
      f"--train_length={_TRAIN_LENGTH.value}",
      f"--train_steps={_TRAIN_STEPS.value}",
  ] + [f"--engine={','.join(_OVERRIDES.value)}"] * bool(_OVERRIDES.value)
  print(f"[bench] running {part} ...", flush=True)
  subprocess.run(cmd, check=True)
  with open(os.path.join(workdir, f"{part}.json")) as f:
    return json.load(f)


def _row(name, r, data, roof_gflops):
  import numpy as np

  cfg, n = data["cfg"], data["num_params"]
  lengths = [len(it.ids) for it in data["items"]]
  flops = costs.forward_flops(cfg, lengths, n)
  gflops = flops / r["steady_s"] / 1e9
  tokens = sum(lengths)
  return dict(
      name=name,
      tok_s=tokens / r["steady_s"],
      samples_s=len(lengths) / r["steady_s"],
      gflops=gflops,
      roof=gflops / roof_gflops,
      exec_gflops=r["executed_flops"] / r["steady_s"] / 1e9,
      steady_s=r["steady_s"],
      compile_s=r.get("compile_s", 0.0),
      shapes=r.get("shapes", "-"),
      padding=r.get("padding", 0.0),
      rss=r["peak_rss_mib"],
      runs=r.get("runs", [r["steady_s"]]),
      load=r.get("loads", []),
      host_s=r.get("host_s", 0.0),
      prefixes=r.get("prefixes", []),
      prefix_share=r.get("prefix_share", 0.0),
      rows=r.get("rows"),
      tokens=tokens,
      texts=len(lengths),
      mean_len=float(np.mean(lengths)),
  )


def _best(runs):
  best = min(runs, key=lambda r: r["steady_s"])
  best = dict(best)
  best["runs"] = [r["steady_s"] for r in runs]
  best["loads"] = [r["loadavg"] for r in runs]
  return best


def _report(data, rows, roof, dp, machine, extra) -> str:
  ref = next((r for r in rows if r["name"].startswith("reference")), None)
  lines = [
      "| method | tokens/s | samples/s | model GFLOP/s | % of roofline | executed GFLOP/s "
      "| steady s (runs) | compile s | shapes | padding | peak RSS MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    runs = ", ".join(f"{x:.1f}" for x in r["runs"])
    lines.append(
        f"| {r['name']} | {r['tok_s']:.0f} | {r['samples_s']:.2f} | {r['gflops']:.1f} | "
        f"{r['roof']:.0%} | {r['exec_gflops']:.1f} | {r['steady_s']:.1f} ({runs}) | "
        f"{r['compile_s']:.1f} | {r['shapes']} | {r['padding']:.1%} | {r['rss']:.0f} |"
    )
  lines.append(
      f"| matmul roofline ({common.roofline_label(roof)}) | - | - | "
      f"{roof['gflops']:.1f} | 100% | {roof['gflops']:.1f} | - | - | - | - | - |"
  )
  loads = ", ".join(
      f"{r['name'].split(' ')[0]} {'/'.join(f'{x:.1f}' for x in r['load'])}" for r in rows
  )
  lines.append("")
  lines.append(
      f"1-minute load average at the end of each run ({loads}) on "
      f"{os.cpu_count()} cores: above the core count, other processes shared the CPU "
      "and the numbers understate both methods (torch's spinning threads suffer most)."
  )
  r0 = rows[0]
  out = [
      f"Machine: {machine}",
      "",
      f"Work: {data['num_records']} ShareGPT records × {_K.value} prompts ({data['prompts_file']}) "
      f"= {r0['texts']} texts, {r0['tokens']} tokens (mean {r0['mean_len']:.0f}); "
      f"SmolLM2-135M-Instruct from the embedded GGUF, θ = {data['num_params']:,}; "
      f"tokenization {data['tokenize_s']:.1f} s (once, not in the throughputs).",
      "",
      *lines,
      "",
  ]
  if dp is not None:
    out.append(
        f"Agreement: max |Δp| = {dp:.2e} over {r0['texts']}×5 probabilities "
        f"(bound {_TOLERANCE.value:.0e}): {'OK' if dp <= _TOLERANCE.value else 'FAIL'}."
    )
  ours = next(r for r in rows if r["name"].startswith("ours"))
  out.append(
      f"Host work in our steady pass (batch padding): {ours['host_s'] * 1e3:.0f} ms = "
      f"{ours['host_s'] / ours['steady_s']:.2%}; tokenization of these texts "
      f"{data['tokenize_s']:.2f} s = {data['tokenize_s'] / ours['steady_s']:.1%} of the "
      "steady pass (both are what prefetching could overlap)."
  )
  if ours["rows"]:
    out.append(
        f"Packing: our {r0['texts']} texts ran in {ours['rows']} rows (texts of one prompt "
        "share a row where they fit; the padding column counts the rest)."
    )
  if ours["prefixes"]:
    out.append(
        f"Shared prefixes (computed once per prompt, in the compile column): "
        f"{ours['prefixes']} tokens, {ours['prefix_share']:.1%} of all tokens."
    )
  if ref:
    out.append(
        f"Speed-up of ours over the reference: {ours['tok_s'] / ref['tok_s']:.2f}× "
        f"(target ≥ 1.5×); ours at {ours['roof']:.0%} of the roofline (target ≥ 60 %); "
        f"{ours['shapes']} compiled shapes (target ≤ 5)."
    )
  peak = devices.peak_flops(roof["device_kind"])
  if peak:  # an accelerator: MFU against the vendor's dense bf16 peak
    out.append(
        f"MFU of ours: {ours['gflops'] * 1e9 / (peak * roof['num_devices']):.1%} of "
        f"{roof['num_devices']} × {peak / 1e12:.0f} TFLOP/s ({roof['device_kind']})."
    )
  out += extra
  return "\n".join(out) + "\n"


def main_raters():
  """The configs' models side by side on the same records: ours only, plus the roofline."""
  usable = []
  for path in _RATERS.value:
    flags.FLAGS.config = path
    work = common.bench_items(_load_config(), _NUM_RECORDS.value, _PROMPTS_FILE.value, _K.value)
    usable.append(work["usable"])
  samples = set.intersection(*usable)
  results = []
  with tempfile.TemporaryDirectory(prefix="bench_raters_") as root:
    for i, path in enumerate(_RATERS.value):
      flags.FLAGS.config = path
      workdir = os.path.join(root, str(i))
      os.makedirs(workdir)
      print(f"[bench] {path}: preparing texts ...", flush=True)
      data = _prepare(workdir, samples, hf_copy=False)
      results.append((path, data, _child("ours", workdir)))
    roof = _child("roofline", workdir)
  from jax import numpy as _  # noqa: F401  (machine_description reads jax's backend)

  lines = [
      f"Machine: {common.machine_description()}",
      "",
      f"Work: the first {results[0][1]['num_records']} ShareGPT records usable by every model "
      f"(all K texts within engine.max_tokens) × {_K.value} prompts "
      f"({results[0][1]['prompts_file']}); each model with its own config's engine settings "
      "and its own tokenizer (so the token counts differ).",
      "",
      "| model (config) | θ | vocab | texts | tokens | tokens/s | samples/s | model GFLOP/s "
      "| % of roofline | steady s | compile s | shapes | padding | head + logsumexp ms/step "
      "| head share | peak RSS MiB | load |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for path, data, r in results:
    row = _row(data["model_name"], dict(r, runs=[r["steady_s"]]), data, roof["gflops"])
    head = r["head_s"] * r["steps"]
    lines.append(
        f"| {data['model_name']} ({path}) | {data['num_params']:,} | {data['cfg'].vocab_size:,} "
        f"| {row['texts']} | {row['tokens']} | {row['tok_s']:.0f} | {row['samples_s']:.2f} "
        f"| {row['gflops']:.1f} | {row['roof']:.0%} | {row['steady_s']:.1f} "
        f"| {row['compile_s']:.1f} | {row['shapes']} | {row['padding']:.1%} "
        f"| {r['head_s'] * 1e3:.0f} | {head / r['steady_s']:.1%} | {row['rss']:.0f} "
        f"| {r['loadavg']:.1f} |"
    )
  lines += [
      "",
      f"Roofline: {common.roofline_label(roof)}. Model FLOPs as in the "
      "table above (models/costs.py, each model's own layers and attention pattern). Head + "
      "logsumexp: the vocabulary projection and the full-vocabulary logsumexp at one step's "
      "read-out slots (engine.batch_size × engine.max_segments rows), jit'd alone, best of 5; "
      "head share = that × steps / steady seconds. Load: the 1-minute load average at the end "
      f"of the run on {os.cpu_count()} cores (above the core count, other work shared the CPU).",
  ]
  text = "\n".join(lines) + "\n"
  print("\n" + text)
  if _OUTPUT.value:
    common.write_markdown(
        _OUTPUT.value,
        "bench_raters",
        "Two raters side by side (`python bench/bench_score.py --raters=...`)",
        text,
    )


def main_parent():
  import numpy as np

  if _RATERS.value:
    return main_raters()
  with tempfile.TemporaryDirectory(prefix="bench_score_") as workdir:
    print("[bench] preparing texts and an HF copy of the weights ...", flush=True)
    data = _prepare(workdir, train=_TRAIN.value)
    lengths = [len(it.ids) for it in data["items"]]
    print(
        f"[bench] {data['num_records']} records, {len(lengths)} texts, {sum(lengths)} tokens",
        flush=True,
    )
    refs, ours = [], []
    for _ in range(_REPEATS.value):
      if not _SKIP_REFERENCE.value:
        refs.append(_child("reference", workdir))
      ours.append(_child("ours", workdir))
    roof = _child("roofline", workdir)
    train = (
        [_child("train_reference", workdir), _child("train_ours", workdir)] if _TRAIN.value else []
    )
  rows = []
  dp = None
  if refs:
    rows.append(
        _row("reference (HF+torch fp32, batch 1, full logits)", _best(refs), data, roof["gflops"])
    )
    dp = max(
        float(np.max(np.abs(np.asarray(r["probs"]) - np.asarray(o["probs"]))))
        for r in refs
        for o in ours
    )
  overrides = f", {','.join(_OVERRIDES.value)}" if _OVERRIDES.value else ""
  rows.append(_row(f"ours (engine defaults{overrides})", _best(ours), data, roof["gflops"]))
  from jax import numpy as _  # noqa: F401  (machine_description reads jax's backend)

  machine = common.machine_description()
  extra = [
      "",
      "FLOPs (bench/common.py): model FLOPs = 2·θ·tokens + causal attention "
      "(L_layers·4·heads·head_dim·L(L+1)/2 per text), the same for every method; "
      "executed GFLOP/s counts the work each method really does (padding, the head at every "
      "position or only the last, the full L² attention square).",
  ]
  extra += _train_report(train, data, roof)
  text = _report(data, rows, roof, dp, machine, extra)
  print("\n" + text)
  if _OUTPUT.value:
    common.write_markdown(
        _OUTPUT.value, "bench_score", "Scoring throughput (`python bench/bench_score.py`)", text
    )
  if dp is not None and dp > _TOLERANCE.value:
    raise SystemExit(f"max |Δp| {dp:.2e} > {_TOLERANCE.value:.0e}")


def _train_report(train, data, roof) -> list[str]:
  if not train:
    return ["", "Training throughput: not run (--notrain)."]
  cfg, rows = data["cfg"], data["train_rows"]
  fpt = costs.train_flops_per_token(cfg, _TRAIN_LENGTH.value)
  examples = sum(len(set(r[r > 0].tolist())) for r in rows["segment_ids"])
  out = [
      "",
      f"## Training step (SmolLM2-135M fp32 on CPU, {_TRAIN_ROWS.value} packed rows × "
      f"{_TRAIN_LENGTH.value} tokens, AdamW, best of {_TRAIN_STEPS.value} steps after a warm-up)",
      "",
      f"The rows are the trainer's own: the bench records in {_TRAIN_CONFIG}'s template "
      f"({examples} examples packed), the loss on response tokens only "
      f"({(rows['weights'] > 0).mean():.0%} of positions; padding "
      f"{(rows['segment_ids'] == 0).mean():.0%}). Both steps run the same rows and mask.",
      "",
      "| method | tokens/s | model GFLOP/s | MFU (vs the matmul roofline) | step s (runs) "
      "| compile / first step s | peak RSS MiB |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in train:
    tok_s = _TRAIN_ROWS.value * _TRAIN_LENGTH.value / r["step_s"]
    gflops = tok_s * fpt / 1e9
    runs = ", ".join(f"{x:.1f}" for x in r["runs"])
    out.append(
        f"| {r['name']} | {tok_s:.0f} | {gflops:.1f} | {gflops / roof['gflops']:.0%} | "
        f"{r['step_s']:.1f} ({runs}) | {r['first_s']:.1f} | {r['peak_rss_mib']:.0f} |"
    )
  out.append(
      f"Training FLOPs per token: selectit_jax/training/perf.py (6·N + 12·L·H·Q·T, "
      f"{fpt / 1e6:.0f} MFLOP at T={_TRAIN_LENGTH.value}); the same for both rows. "
      f"Our step's loss {train[1]['loss']:.4f} vs torch {train[0]['loss']:.4f} on the "
      "first step (ours masks attention by segment, torch sees each row as one sequence)."
  )
  return out


def _train_rows(records, tokenizer) -> dict:
  """The bench records as the trainer feeds them (configs/train_smollm2_135m.py's template,
  loss on the response tokens only), packed into [rows, length] as a step packs them."""
  from selectit_jax.training import data as data_lib

  config = common.load_config(_TRAIN_CONFIG)
  config.data.max_length = _TRAIN_LENGTH.value
  examples, _ = data_lib.prepare(records, tokenizer, config.data)
  rows = data_lib.pack(examples, _TRAIN_LENGTH.value, seed=0)
  if len(rows["inputs"]) < _TRAIN_ROWS.value:
    raise ValueError(f"only {len(rows['inputs'])} packed rows; lower --train_rows")
  return {k: v[: _TRAIN_ROWS.value] for k, v in rows.items()}


# ---------------------------------------------------------------------------------- children


def _load_data(workdir):
  with open(os.path.join(workdir, "data.pkl"), "rb") as f:
    return pickle.load(f)


def _write(workdir, part, result):
  result["peak_rss_mib"] = common.peak_rss_mib()
  result["loadavg"] = os.getloadavg()[0]  # other work on the machine slows a run down
  with open(os.path.join(workdir, f"{part}.json"), "w") as f:
    json.dump(result, f)


def part_reference(workdir):
  """Released-code method: batch 1, logits at every position, full-vocab softmax at the last."""
  import numpy as np
  import torch
  import transformers

  data = _load_data(workdir)
  model = transformers.LlamaForCausalLM.from_pretrained(
      os.path.join(workdir, "hf"), torch_dtype=torch.float32
  ).eval()
  rating_ids = torch.as_tensor(data["rating_ids"], dtype=torch.long)
  items = data["items"]

  def probs_of(ids):
    logits = model(input_ids=torch.tensor([ids])).logits  # [1, L, vocab]
    return torch.softmax(logits[0, -1].float(), dim=-1)[rating_ids].double().numpy()

  with torch.inference_mode():
    probs_of(items[0].ids)  # warm-up (allocator, thread pool)
    start = time.perf_counter()
    probs = [probs_of(it.ids) for it in items]
    steady = time.perf_counter() - start
  cfg = data["cfg"]
  lengths = [len(it.ids) for it in items]
  _write(
      workdir,
      "reference",
      dict(
          steady_s=steady,
          probs=np.stack(probs).tolist(),
          executed_flops=costs.executed_flops(  # eager attention: the full L² square
              dataclasses.replace(cfg, attention_block=0), lengths, lengths
          ),
          torch_threads=torch.get_num_threads(),
      ),
  )


def part_ours(workdir):
  """Our engine: plan (buckets, batches), compile every bucket shape, then the timed pass."""
  import numpy as np
  from selectit_jax import checkpoints
  from selectit_jax.parallel import sharding

  data = _load_data(workdir)
  config = _load_config()
  e = config.engine
  mesh = sharding.make_mesh(config.mesh)
  config = devices.resolve_dtypes(config, mesh.devices.flat[0].platform)
  model = checkpoints.load_model(
      data["model_path"], mesh, dtype=config.model.dtype, param_dtype=config.model.param_dtype
  )
  items = data["items"]
  scorer, plan, compile_s = common.compiled_scorer(
      config, model, mesh, items, data["rating_ids"], data["pad_id"]
  )
  index = {(it.sample_index, it.prompt_index): i for i, it in enumerate(items)}
  probs = np.zeros((len(items), 5))
  padded, skips, row_tokens, rows = [], [], 0, 0
  start = time.perf_counter()
  host_s = 0.0  # host work between steps (padding): the most that prefetching could hide
  for rated in scorer.rate(plan.batches):
    batch = rated.batch
    host_s += rated.host_seconds
    for it, p in zip(batch.items, rated.probs):
      probs[index[(it.sample_index, it.prompt_index)]] = p
    padded += [batch.length] * e.batch_size
    skips += list(batch.skips) + [0] * (e.batch_size - len(batch.rows))
    row_tokens += batch.row_tokens
    rows += len(batch.rows)
  steady = time.perf_counter() - start
  head_s = _head_seconds(model, e.batch_size, e.max_segments)
  prefix_lengths = [len(x) for x in plan.prefixes]
  _write(
      workdir,
      "ours",
      dict(
          steady_s=steady,
          compile_s=compile_s,
          shapes=len(scorer.compiled_shapes),
          buckets=plan.buckets,
          prefixes=prefix_lengths,
          rows=rows,
          padding=1 - row_tokens / sum(padded),
          prefix_share=1 - row_tokens / sum(len(it.ids) for it in items),
          head_s=head_s,
          steps=len(plan.batches),
          probs=probs.tolist(),
          host_s=host_s,
          executed_flops=costs.executed_flops(
              model.config, padded, e.max_segments, prefix_lengths=skips
          ),
      ),
  )


def _head_seconds(model, batch_size: int, max_segments: int) -> float:
  """Best-of-5 seconds of the head + full-vocabulary logsumexp at one step's read-out slots."""
  import jax
  import jax.numpy as jnp
  from selectit_jax.models import registry

  module = registry.build(model.config)
  hidden = jnp.ones((batch_size, max_segments, model.config.hidden_size), model.config.dtype)

  @jax.jit
  def head(params, h):
    logits = module.apply({"params": params}, h, method="logits")
    return jax.nn.logsumexp(logits, axis=-1)

  jax.block_until_ready(head(model.params, hidden))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(head(model.params, hidden))
    times.append(time.perf_counter() - start)
  return min(times)


def _time_steps(step, first_s, name, workdir, part, loss):
  import numpy as np

  runs = []
  for _ in range(_TRAIN_STEPS.value):
    start = time.perf_counter()
    step()
    runs.append(time.perf_counter() - start)
  _write(
      workdir,
      part,
      dict(name=name, step_s=float(np.min(runs)), runs=runs, first_s=first_s, loss=loss),
  )


def part_train_reference(workdir):
  """A plain HF+torch fp32 step: forward with labels, backward, AdamW (lr 2e-5)."""
  import torch
  import transformers

  data = _load_data(workdir)
  rows = data["train_rows"]
  model = transformers.LlamaForCausalLM.from_pretrained(
      os.path.join(workdir, "hf"), torch_dtype=torch.float32
  ).train()
  opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0)
  inputs = torch.as_tensor(rows["inputs"], dtype=torch.long)
  labels = torch.as_tensor(rows["targets"], dtype=torch.long)
  labels[torch.as_tensor(rows["weights"]) == 0] = -100

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100
    )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  start = time.perf_counter()
  loss = step()
  _time_steps(
      step,
      time.perf_counter() - start,
      "HF+torch fp32 (plain step)",
      workdir,
      "train_reference",
      loss,
  )


def part_train_ours(workdir):
  """Our trainer's jit'd step (selectit_jax.training.step), one micro-batch per step."""
  import jax
  from selectit_jax import checkpoints
  from selectit_jax.parallel import sharding
  from selectit_jax.training import step as step_lib

  data = _load_data(workdir)
  rows = data["train_rows"]
  config = common.load_config(_TRAIN_CONFIG)
  mesh = sharding.make_mesh(config.mesh)
  model = checkpoints.load_model(
      data["model_path"],
      mesh,
      dtype=config.model.dtype,
      param_dtype=config.model.param_dtype,
      remat=config.model.remat,
  )
  cfg = model.config
  sched = step_lib.schedule(config.train, 1000)
  tx = step_lib.optimizer(config.train, sched)
  shardings = step_lib.state_shardings(cfg, tx, mesh)
  state = step_lib.init_state(model.params, tx, shardings)
  train_step = step_lib.make_train_step(cfg, tx, sched, mesh, shardings)
  batch = jax.device_put(
      {k: v[None] for k, v in rows.items()}, step_lib.accumulation_sharding(mesh)
  )
  holder = {"state": state}

  def step():
    holder["state"], metrics = train_step(holder["state"], batch)
    return float(jax.block_until_ready(metrics["loss"]))

  start = time.perf_counter()
  loss = step()
  _time_steps(
      step,
      time.perf_counter() - start,
      f"ours (selectit_jax.training step, fp32, remat={cfg.remat})",
      workdir,
      "train_ours",
      loss,
  )


def part_roofline(workdir):
  _write(workdir, "roofline", common.matmul_roofline())


def main(argv):
  del argv
  if _PART.value == "main":
    main_parent()
  else:
    {
        "reference": part_reference,
        "ours": part_ours,
        "roofline": part_roofline,
        "train_reference": part_train_reference,
        "train_ours": part_train_ours,
    }[_PART.value](_WORKDIR.value)


if __name__ == "__main__":
  cli.run_main(main)
