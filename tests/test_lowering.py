"""The steps lowered for TPU and GPU on this CPU (`jax.export`, platforms=[...]): the engine's
rating step, the prefix prefill and the training step, sharded over a mesh, with the Pallas
kernels lowered natively (splash through Mosaic, flash attention through Triton) rather than
interpreted as tests/test_attention.py runs them, and cuDNN's (jax told it has a GPU). What
no accelerator here can run still has to lower: kernel block shapes, the per-shard wrapping,
the kernels' backward. With bf16 configs every matrix product takes bf16 operands (fp32
accumulation) while norms, softmax and log-sum-exp stay in fp32; and on the GPU no step may
hold a conditional: XLA:GPU reads a conditional's predicate back to the host."""

import contextlib
import dataclasses
import re

import jax
from jax import export
from jax._src.cudnn import fused_attention_stablehlo as cudnn_jax
import jax.numpy as jnp
import pytest

from selectit_jax import errors
from selectit_jax.models import attention
from selectit_jax.models import registry
from selectit_jax.parallel import sharding
from selectit_jax.training import loss as loss_lib
from tests.conftest import (
    TINY_GEMMA3,
    abstract_params,
    abstract_rating_step,
    abstract_train_step,
    mesh_of,
    tiny_config,
)

# Head dims of the real models: LLaMA-2's 128, Gemma 3's 256 (270M); GQA in both.
FAMILIES = {
    "llama": tiny_config(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=128),
    # The window reaches past every row here: the kernels apply no window (attention.kernel_for).
    "gemma": dataclasses.replace(TINY_GEMMA3, head_dim=256, sliding_window=1024),
}
# (backend, export platform, the kernel's custom call in StableHLO)
KERNELS = [("splash", "tpu", "tpu_custom_call"), ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton")]
# Triton and cuDNN calls carry no serialization guarantee; these modules are lowered, never
# stored.
_CHECKS = [
    export.DisabledSafetyCheck.custom_call(name)
    for name in ("__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax", "__cudnn$fmhaScaleBiasSoftmax")
    + ("__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaScaleBiasSoftmaxBackward")
]


@contextlib.contextmanager
def _native(platform):
  """Steps built and lowered in here see `platform`: the kernels native, not interpreted,
  and on the GPU the loss without its skipping conditional (as `loss_groups` sees there)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(attention, "interpreted", lambda: False)
    if platform == "cuda":
      real = loss_lib.skips_unweighted
      patch.setattr(loss_lib, "skips_unweighted", lambda _: real("gpu"))
    yield


@contextlib.contextmanager
def _cudnn(capability: str):
  """cuDNN 9.10 on a GPU of this compute capability, as jax's cuDNN attention sees them: it
  asks the GPU backend, which this CPU lacks (jax internals; launch/constraints.txt pins jax)."""
  version = lambda c: tuple(int(x) for x in c.split("."))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(cudnn_jax, "check_cudnn_version", lambda: 91000)
    patch.setattr(
        cudnn_jax, "check_compute_capability", lambda c: version(capability) >= version(c)
    )
    patch.setattr(cudnn_jax, "is_cuda_compute_capability_equal", lambda c: capability == c)
    patch.setitem(attention._PLATFORMS, "cudnn", ("gpu", "cpu"))
    yield


def _lower(fn, args, platform, mesh, rules=sharding.LOGICAL_AXIS_RULES) -> str:
  """StableHLO of `fn` on `args` for `platform` (call within `_native(platform)`)."""
  with sharding.activate(mesh, rules):
    return export.export(fn, platforms=[platform], disabled_checks=_CHECKS)(*args).mlir_module()


def _conditionals(text: str) -> int:
  return len(re.findall(r"stablehlo\.(?:if|case)\b", text))


_DOT = re.compile(
    r"stablehlo\.dot_general .*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)"
)


def _low_precision_math(text: str, cfg) -> list[tuple[str, str]]:
  """rsqrt (norms), log and exp (softmax, log-sum-exp) not in fp32, but for the gated MLP's
  activation, which runs in the compute dtype on [rows, intermediate] (silu's exp, gelu's
  tanh)."""
  ops = re.findall(r"= stablehlo\.(rsqrt|exponential|log) %\S+ : tensor<([^>]*)>", text)
  mlp = f"x{cfg.intermediate_size}xbf16"
  return [(op, t) for op, t in ops if not t.endswith("f32") and not t.endswith(mlp)]


def _fp32_matmuls(text: str) -> list[tuple[str, str, str]]:
  """dot_generals that take fp32 operands and are matrix products: not the row-wise vector
  products (Σ dO·O over the head dim in the kernels' backward: as many products as outputs
  times one head dim, memory-bound whatever the dtype)."""
  dims = lambda t: t.removeprefix("tensor<").removesuffix(">").split("x")
  found = []
  for lhs, rhs, out in _DOT.findall(text):
    if "f32" in lhs + rhs and not (lhs == rhs and dims(out)[:-1] == dims(lhs)[:-2]):
      found.append((lhs, rhs, out))
  return found


def _cfg(family, backend):
  return dataclasses.replace(FAMILIES[family], attention=backend, dtype="bfloat16")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend,platform,call", KERNELS)
@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 1, 2)])
def test_rating_step_lowers_with_the_native_kernel(family, backend, platform, call, mesh_shape):
  """Packed rows (2 texts a row) continuing a 40-token prefix: the prefix and own halves,
  each a kernel call, on one device and on rows × kv heads split over 4 (shard_map)."""
  mesh = mesh_of(mesh_shape)
  with _native(platform):
    step, args = abstract_rating_step(_cfg(family, backend), mesh, 4, 200, 40, 2)
    text = _lower(step, args, platform, mesh)
  # Prefix and own halves in the scanned layers (the last layer's read-out rows: jnp path).
  assert text.count(f"custom_call @{call}(") >= 2, text[:2000]
  assert _conditionals(text) == 0
  assert _fp32_matmuls(text) == []  # bf16 matmuls (fp32 accumulation: preferred_element_type)
  assert _low_precision_math(text, FAMILIES[family]) == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend,platform,call", KERNELS)
def test_prefix_prefill_lowers_with_the_native_kernel(family, backend, platform, call):
  cfg = _cfg(family, backend)
  mesh = mesh_of((2, 1, 2))
  params = abstract_params(cfg, mesh)
  tokens = jax.ShapeDtypeStruct((5, 40), jnp.int32)
  valid = jax.ShapeDtypeStruct((5, 40), jnp.bool_)
  with _native(platform):
    prefill = registry.prefix_prefill(cfg, jax.tree.map(lambda x: x.sharding, params), mesh)
    args = (params, tokens, valid)
    text = _lower(prefill.jitted, args, platform, mesh, sharding.REPLICATED_ROWS_RULES)
  assert f"custom_call @{call}(" in text
  assert _conditionals(text) == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend,platform,call", KERNELS)
def test_training_step_lowers_with_the_native_kernels_and_their_backward(
    family, backend, platform, call
):
  """fsdp × tensor × data, 2 micro-batches: the kernel's forward and its two backward
  kernels (dq; dk and dv); on the GPU the loss runs every chunk, with no conditional."""
  mesh = mesh_of((2, 2, 2))
  with _native(platform):
    step, args = abstract_train_step(_cfg(family, backend), mesh, 2, 4, 256)
    text = _lower(step, args, platform, mesh)
  assert text.count(f"custom_call @{call}(") >= 3, text[:2000]
  assert _fp32_matmuls(text) == []
  assert _low_precision_math(text, FAMILIES[family]) == []
  conditionals = _conditionals(text)
  assert conditionals == 0 if platform == "cuda" else conditionals >= 1  # TPU: the loss skips


@pytest.mark.parametrize("family", FAMILIES)
def test_cudnn_steps_lower_on_hopper(family):
  """cuDNN's fused attention (`jax.nn.dot_product_attention`): the rating step's own half
  (segment mask as a bias) and prefix half (valid lengths), the training step's forward and
  backward; no conditional, bf16 matmuls, fp32 softmax."""
  cfg = _cfg(family, "cudnn")
  with _cudnn("9.0"), _native("cuda"):
    rating_mesh, train_mesh = mesh_of((2, 1, 2)), mesh_of((2, 2, 2))
    rating = _lower(*abstract_rating_step(cfg, rating_mesh, 4, 200, 40, 2), "cuda", rating_mesh)
    train = _lower(*abstract_train_step(cfg, train_mesh, 2, 4, 256), "cuda", train_mesh)
  assert "custom_call @__cudnn$fmhaScaleBiasSoftmax(" in rating  # own keys
  assert "custom_call @__cudnn$fmhaSoftmax(" in rating  # prefix keys
  assert "custom_call @__cudnn$fmhaScaleBiasSoftmaxBackward(" in train
  for text in (rating, train):
    assert _conditionals(text) == 0
    assert _fp32_matmuls(text) == []
    assert _low_precision_math(text, FAMILIES[family]) == []


def test_cudnn_refuses_what_this_gpu_cannot_run_in_one_line():
  """Gemma 3's head dim 256 on an A100: cuDNN runs at most 128 before Hopper; jax says so,
  and the engine passes it on as a user error that names the setting."""
  mesh = mesh_of((1, 1, 1))
  with _cudnn("8.0"), _native("cuda"):
    with pytest.raises(errors.UserError, match=r"engine.attention=cudnn: .*head dim .*<= 128"):
      _lower(*abstract_rating_step(_cfg("gemma", "cudnn"), mesh, 4, 200, 40, 2), "cuda", mesh)
    llama_step, llama_args = abstract_rating_step(_cfg("llama", "cudnn"), mesh, 4, 200, 40, 2)
    assert "__cudnn$" in _lower(llama_step, llama_args, "cuda", mesh)  # head dim 128 runs


def test_interpreted_on_cpu_only():
  """Here the kernels run interpreted, so the same step lowered for CPU holds no kernel call."""
  assert attention.interpreted()
  mesh = mesh_of((1, 1, 1))
  step, args = abstract_rating_step(_cfg("llama", "splash"), mesh, 2, 128, 16, 1)
  with sharding.activate(mesh):
    text = step.lower(*args).as_text()
  assert "custom_call @tpu_custom_call(" not in text
