"""Shared pieces of the benchmarks: roofline, peak RSS, machine description.

FLOPs come from the one cost model, selectit_jax/models/costs.py: `forward_flops` (model
FLOPs, the same useful work for every method, so GFLOP/s, % of roofline and MFU compare like
for like; a method gets no credit for padding and no penalty for work it avoids) and
`executed_flops` (the work each method actually runs). Peaks: selectit_jax/parallel/devices.py.
"""

from __future__ import annotations

import os
import platform
import resource
import time

# The released rating prompts (/work/shared/reference/rating_prompt.txt), read like the
# released code (one per line); the benchmarks' default.
RELEASED_PROMPTS = os.path.normpath(
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "..",
        "..",
        "shared",
        "reference",
        "rating_prompt.txt",
    )
)


def peak_rss_mib() -> float:
  """Peak resident set size of this process since its exec (VmHWM; ru_maxrss would carry the
  forking parent's peak across fork+exec)."""
  try:
    with open("/proc/self/status") as f:
      return int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best_seconds(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)  # best: contention only slows a run


def matmul_roofline(sizes=(2048, 3072), repeats: int = 10) -> dict:
  """Best GFLOP/s of an fp32 n×n matmul over `sizes`, in XLA (jit) and, where installed, in
  torch (MKL/oneDNN): the roofline is the faster library's, so it is this machine's, not
  only XLA's (on the Intel machine torch's sgemm runs ~15 % faster than XLA's)."""
  import jax
  import jax.numpy as jnp

  libraries = {"jax": {}}
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    seconds = _best_seconds(lambda: f(a, b).block_until_ready(), repeats)
    libraries["jax"][n] = 2 * n**3 / seconds / 1e9
  try:
    import torch
  except ImportError:
    torch = None
  if torch is not None and jax.default_backend() == "cpu":
    libraries["torch"] = {}
    for n in sizes:
      a, b = torch.randn(n, n), torch.randn(n, n)
      libraries["torch"][n] = 2 * n**3 / _best_seconds(lambda: a @ b, repeats) / 1e9
  best = {lib: max(by_size.values()) for lib, by_size in libraries.items()}
  return {
      "gflops": max(best.values()),
      "by_library": best,
      "sizes": list(sizes),
      "device_kind": jax.devices()[0].device_kind,
      "num_devices": jax.device_count(),
  }


def roofline_label(roof: dict) -> str:
  """How the roofline was measured, for the reports."""
  libs = " and ".join(f"{lib} {g:.1f}" for lib, g in roof["by_library"].items())
  sizes = ", ".join(str(n) for n in roof["sizes"])
  return f"fp32 n×n matmul, n = {sizes}: best of {libs} GFLOP/s"


def machine_description() -> str:
  """CPU model, cores, memory, and the library versions that matter for the numbers."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      fl = next((l for l in f if l.startswith("flags")), "").split()
    flags = ", ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if x in fl)
  except OSError:
    pass
  mem = ""
  try:
    with open("/proc/meminfo") as f:
      kib = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
    mem = f", {kib / 2**20:.0f} GiB RAM"
  except (OSError, StopIteration):
    pass
  import jax
  import torch
  import transformers

  return (
      f"{cpu} ({flags}), {os.cpu_count()} cores visible{mem}; "
      f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}, "
      f"transformers {transformers.__version__}, Python {platform.python_version()}"
  )


def load_config(path: str, overrides=()):
  """A config file's get_config(), with 'key=value' / 'section.key=value' overrides (bare keys
  are engine keys), each cast to the type of the value it replaces."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for kv in overrides:
    key, value = kv.split("=", 1)
    section, key = key.split(".", 1) if "." in key else ("engine", key)
    old = config[section][key]
    config[section][key] = type(old)(value) if not isinstance(old, bool) else value == "True"
  return config


def bench_items(config, num_records: int, prompts_file: str, k: int, samples=None) -> dict:
  """The benchmarks' texts: the first `num_records` usable records of config.data (all K
  texts within engine.max_tokens, none truncated) × the first `k` prompts of `prompts_file`
  ('' = our own prompts), in the config's template; work items sorted by (sample, prompt).

  samples: keep only these sample indices (several models on the same records).
  Returns items, records (the kept ones), prompts, rating_ids, tokenizer, model_path,
  num_records, usable (every usable sample index read) and tokenize_s (the kept texts' share
  of the tokenization time)."""
  from selectit_jax import assets
  from selectit_jax.checkpoints.tokenizer import load_tokenizer, rating_token_ids
  from selectit_jax.data import prompts as prompts_lib
  from selectit_jax.data import records as records_lib
  from selectit_jax.scoring import batching

  model_path = assets.model_path(config.model)
  data_cfg = config.data.copy_and_resolve_references()
  data_cfg.path = assets.data_path(config.data)
  data_cfg.limit = 4 * num_records + 32  # ~25 % of ShareGPT records are unusable
  records, _, _ = records_lib.read_records(data_cfg)
  template = prompts_lib.DEFAULT_TEMPLATE
  prompts = (
      prompts_lib.load_prompts(prompts_file) if prompts_file else prompts_lib.default_prompts()
  )[:k]
  tokenizer = load_tokenizer(model_path)
  start = time.perf_counter()
  items, _ = batching.prepare(
      records, prompts, template, tokenizer, config.engine.max_tokens, too_long="reject"
  )
  tokenize_s = time.perf_counter() - start
  all_items = len(items)
  usable = {it.sample_index for it in items}
  keep = set(sorted(usable if samples is None else usable & set(samples))[:num_records])
  if len(keep) < num_records:
    raise ValueError(f"only {len(keep)} usable records among the first {data_cfg.limit}")
  items = sorted(
      (it for it in items if it.sample_index in keep),
      key=lambda it: (it.sample_index, it.prompt_index),
  )
  return dict(
      items=items,
      records=[r for r in records if r.index in keep],
      prompts=prompts,
      rating_ids=rating_token_ids(tokenizer, prompts_lib.build_text(prompts[0], "", "", template)),
      tokenizer=tokenizer,
      model_path=model_path,
      num_records=len(keep),
      usable=usable,
      tokenize_s=tokenize_s * len(items) / max(all_items, 1),
  )


def compiled_scorer(config, model, mesh, items, rating_ids, pad_id):
  """The engine as a scoring run builds it: the plan of `items` (buckets, batches, shared
  prefixes) and a Scorer with every bucket shape compiled. Returns (scorer, plan, compile
  seconds, the prefixes' prefill included)."""
  from selectit_jax.scoring import batching
  from selectit_jax.scoring import engine

  e = config.engine
  plan = batching.make_plan(items, e, model.config)
  start = time.perf_counter()
  scorer = engine.Scorer(
      model.config,
      model.params,
      rating_ids,
      mesh,
      e.batch_size,
      plan.prefixes,
      e.max_segments,
      pad_id,
  )
  scorer.compile(plan.buckets)
  return scorer, plan, time.perf_counter() - start


def write_markdown(path: str, name: str, title: str, text: str) -> None:
  """Replaces `name`'s generated section of `path` (between its markers), keeping the rest;
  appends the section when it is not there yet."""
  begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
  block = f"{begin}\n## {title}\n\n{text}{end}"
  old = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
  if begin in old and end in old:
    new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
  else:
    new = old.rstrip("\n") + "\n\n" + block + "\n"
  with open(path + ".tmp", "w") as f:
    f.write(new)
  os.replace(path + ".tmp", path)
