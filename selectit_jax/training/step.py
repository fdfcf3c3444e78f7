"""Train state, optimizer, response-only loss, gradient accumulation, jit'd sharded steps.

The state is a plain dict {step, params, opt_state} (orbax saves and restores it as is).
Params are kept in `param_dtype` (fp32 master weights); the model casts them to `dtype`
(e.g. bf16) for compute, so gradients and the AdamW moments stay fp32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from selectit_jax import checkpoints
from selectit_jax.parallel import sharding
from selectit_jax.models import registry
from selectit_jax.training import loss as loss_lib
from selectit_jax.models.layers import DecoderConfig

SCHEDULES = ("cosine", "linear", "constant")


def schedule(train_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup over ceil(warmup_ratio * total) steps (HF Trainer's rounding), then decay
  to 0 at `total_steps`."""
  lr = float(train_cfg.learning_rate)
  warmup = min(math.ceil(float(train_cfg.warmup_ratio) * total_steps), total_steps)
  rest = max(total_steps - warmup, 1)
  kind = train_cfg.schedule
  if kind not in SCHEDULES:
    raise ValueError(f"train.schedule={kind!r}; expected one of {SCHEDULES}")
  decay = {
      "cosine": optax.cosine_decay_schedule(lr, rest),
      "linear": optax.linear_schedule(lr, 0.0, rest),
      "constant": optax.constant_schedule(lr),
  }[kind]
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def optimizer(train_cfg, sched: optax.Schedule) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(float(train_cfg.max_grad_norm)),
      optax.adamw(
          sched,
          b1=float(train_cfg.b1),
          b2=float(train_cfg.b2),
          eps=float(train_cfg.eps),
          weight_decay=float(train_cfg.weight_decay),
      ),
  )


def state_shardings(cfg: DecoderConfig, tx, mesh):
  """NamedShardings of the state: params by the logical-axis rules; AdamW moments like
  their params (optax maps over the boxed params, keeping the axis names); scalars
  replicated."""
  boxed = checkpoints.param_shapes(cfg)["params"]
  params_sh = sharding.param_shardings(boxed, mesh)
  opt_sh = sharding.logical_to_sharding(jax.eval_shape(tx.init, boxed), mesh)
  return {"step": sharding.replicated(mesh), "params": params_sh, "opt_state": opt_sh}


def abstract_state(cfg: DecoderConfig, tx, shardings):
  """ShapeDtypeStructs with shardings: the restore target (no weights are read)."""
  params = nn.unbox(checkpoints.param_shapes(cfg)["params"])
  shapes = {
      "step": jax.ShapeDtypeStruct((), jnp.int32),
      "params": params,
      "opt_state": jax.eval_shape(tx.init, params),
  }
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def init_state(params, tx, shardings):
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"step": step, "params": params, "opt_state": opt_state}


def loss_sums(
    model: nn.Module, params, batch, loss_chunk: int = loss_lib.DEFAULT_CHUNK, groups: int = 0
):
  """(Σ weighted token NLL, Σ weights) of one micro-batch: logits and log-softmax in fp32,
  `loss_chunk` positions of each row at a time, skipping unweighted positions within each
  of `groups` runs of rows when > 0 (training/loss.py; `loss_groups`)."""
  variables = {"params": params}
  hidden = model.apply(variables, batch["inputs"], batch["positions"], batch["segment_ids"])
  chunk = loss_lib.chunk_size(hidden.shape[1], loss_chunk)
  softcap = getattr(model.cfg, "final_logit_softcapping", None)
  head = model.apply(variables, method="head")
  nll = loss_lib.nll_sum(hidden, head, batch["targets"], batch["weights"], chunk, softcap, groups)
  return nll, jnp.sum(batch["weights"].astype(jnp.float32))


def loss_groups(mesh) -> int:
  """One run of rows per batch shard for the loss to skip unweighted positions in, or 0
  where the platform's conditionals wait on the host (`loss.skips_unweighted`)."""
  if not loss_lib.skips_unweighted(mesh.devices.flat[0].platform):
    return 0
  return mesh.shape["data"] * mesh.shape["fsdp"]


def accumulation_sharding(mesh) -> NamedSharding:
  """[accum, micro, ...] batches: rows over data×fsdp, the micro-batch axis unsharded."""
  return NamedSharding(mesh, P(None, ("data", "fsdp")))


def make_train_step(
    cfg: DecoderConfig, tx, sched, mesh, shardings, loss_chunk: int = loss_lib.DEFAULT_CHUNK
):
  """jit'd step(state, batch[accum, micro, length]) -> (state, metrics); state donated.

  The batch is one optimizer step: all rows its examples were packed into (accum varies
  with the step; each count compiles once). The loss is the per-token mean NLL over all
  response tokens of the whole step (Σ NLL / Σ weights across micro-batches, not a mean of
  micro-batch means), so accumulation and packing equal one big batch exactly in real
  arithmetic. (The released scripts average per-GPU token means over 4 GPUs of 32
  sequences; with equal token counts the two agree.)
  """
  model = registry.build(cfg)
  groups = loss_groups(mesh)

  def step(state, batch):
    params = state["params"]
    grad_fn = jax.value_and_grad(
        lambda p, b: loss_sums(model, p, b, loss_chunk, groups), has_aux=True
    )

    def micro(carry, mb):
      g_acc, l_acc, n_acc = carry
      (l, n), g = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (g, l, n), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x: x / denom, g)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
    }
    metrics = {
        "loss": l / denom,
        "target_tokens": n,
        "grad_norm": optax.global_norm(grads),
        "learning_rate": sched(state["step"]),
    }
    return new, metrics

  jitted = jax.jit(
      step,
      in_shardings=(shardings, accumulation_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )

  def run(state, batch):
    with sharding.activate(mesh):
      return jitted(state, batch)

  run.jitted = jitted  # to lower or compile it under `sharding.activate(mesh)`
  return run


def make_eval_step(cfg: DecoderConfig, mesh, shardings, loss_chunk: int = loss_lib.DEFAULT_CHUNK):
  """jit'd eval(params, batch[micro, length]) -> (Σ NLL, Σ weights)."""
  model, groups = registry.build(cfg), loss_groups(mesh)
  jitted = jax.jit(
      lambda p, b: loss_sums(model, p, b, loss_chunk, groups),
      in_shardings=(shardings["params"], sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
  )

  def run(params, batch):
    with sharding.activate(mesh):
      return jitted(params, batch)

  return run
