"""SelectIT scoring formulas (paper Eq. 2-5 and the released code's variant).

All functions are pure jnp, vectorised over arbitrary leading axes and keep the
input dtype. Precision: jax runs in float32 unless x64 is on; callers that rank
(selection.py) wrap the computation in `jax.enable_x64(True)` and pass float64,
so rankings match a numpy float64 reference bit for bit up to rounding order.
float32 input is accepted (tests check it agrees with float64 to ~1e-6
relative), but near-ties may then order differently.

Modes, for ratings 1..R (R = the scale, the last axis; the paper's K = 5):
  paper: q = P / sum(P); b = argmax q (first max); S = (b+1) * sum_i |q_i - q_b| / (R-1)
  code:  r = exp(q) / sum(exp(q)) (the released second softmax); b = argmax r
         (first max, 0-based); S = (b+1) * sum_k (r_b - r_k) / 4, R = 5 only: the released
         scripts hard-code five digit ids.
The released token-level script divides by (k - 1) with k its prompt count;
with the default k = 5 that is the same 4 used here for both modes.
Model level divides by sum(w) in both modes (the released script does not);
that scales all scores alike and does not change the ranking.
"""

from typing import Sequence

import jax.numpy as jnp
import numpy as np

MODES = ("paper", "code")
LEVELS = ("token", "sentence", "model")
CODE_SCALE = 5  # code mode reproduces scripts that exist for five ratings only

# Reasons a sample's probabilities are unusable; order = precedence.
# A (sample, model, prompt) cell has no stored row: never scored, or its text changed since
# (cells are matched by content hash).
REASON_MISSING = "missing_scores"
REASON_NONFINITE = "nonfinite_probs"
REASON_NEGATIVE = "negative_probs"
REASON_ZERO_MASS = "zero_digit_mass"


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_scale(scale: int, mode: str = "paper") -> int:
  """Ratings 1..scale, 2 <= scale <= 9; code mode exists for the released five only."""
  if not 2 <= scale <= 9:
    raise ValueError(f"rating scale must be 2..9, got {scale}")
  if mode == "code" and scale != CODE_SCALE:
    raise ValueError(
        f"mode='code' reproduces the released scripts, which exist for a "
        f"{CODE_SCALE}-point scale only; this store rates 1..{scale}: use "
        "mode='paper'"
    )
  return scale


def normalize(probs: jnp.ndarray) -> jnp.ndarray:
  """q_k = P_k / sum_j P_j over the last axis (paper Eq. 2)."""
  return probs / jnp.sum(probs, axis=-1, keepdims=True)


def token_scores(probs: jnp.ndarray, mode: str = "paper") -> jnp.ndarray:
  """Token-level score from P("1")..P("R"): [..., R] -> [...] (Eq. 2-3)."""
  _check_mode(mode)
  probs = jnp.asarray(probs)
  scale = check_scale(probs.shape[-1], mode)
  q = normalize(probs)
  if mode == "code":
    # Released code: plain exp/sum (no max shift; q is in [0, 1] so it is safe
    # and matches numpy's arithmetic).
    e = jnp.exp(q)
    q = e / jnp.sum(e, axis=-1, keepdims=True)
  base = jnp.argmax(q, axis=-1)  # first maximum wins, as numpy
  q_base = jnp.take_along_axis(q, base[..., None], axis=-1)
  spread = jnp.sum(jnp.abs(q - q_base), axis=-1)
  return (base + 1).astype(q.dtype) * spread / (scale - 1)


def sentence_scores(token: jnp.ndarray, alpha: float = 0.2) -> jnp.ndarray:
  """Sentence-level score over the prompt axis (Eq. 4): [..., K] -> [...].

  mean / (1 + alpha * std), population std (ddof=0) as numpy's default.
  """
  token = jnp.asarray(token)
  return jnp.mean(token, axis=-1) / (1.0 + alpha * jnp.std(token, axis=-1))


def model_scores(sent: jnp.ndarray, weights) -> jnp.ndarray:
  """Model-level score over the model axis (Eq. 5): [..., M] -> [...].

  sum_i w_i s_i / sum_i w_i. With w = parameter counts this is Eq. 5; the
  released weights (7/20, 13/20, 70/90) are not normalised there, which
  rescales every score by the same constant and leaves the order unchanged.
  """
  sent = jnp.asarray(sent)
  w = jnp.asarray(weights, dtype=sent.dtype)
  if w.shape != sent.shape[-1:]:
    raise ValueError(f"weights shape {w.shape} != models {sent.shape[-1:]}")
  return jnp.sum(sent * w, axis=-1) / jnp.sum(w)


def cell_reasons(probs, present=None) -> np.ndarray:
  """The one validity rule, for select and sweep alike: per [..., 5] probability vector, ''
  if it can be scored, else why not (`present` False: no stored row)."""
  p = np.asarray(probs, dtype=np.float64)
  finite = np.all(np.isfinite(p), axis=-1)
  negative = np.any(p < 0, axis=-1)
  mass = np.sum(np.where(np.isfinite(p), p, 0.0), axis=-1)
  out = np.full(p.shape[:-1], "", dtype=object)
  out[~(mass > 0)] = REASON_ZERO_MASS
  out[negative] = REASON_NEGATIVE
  out[~finite] = REASON_NONFINITE
  if present is not None:
    out[~np.asarray(present, bool)] = REASON_MISSING
  return out


def resolve_weights(spec, num_params: Sequence[int]) -> np.ndarray:
  """Model weights from a config value.

  spec: None or '' -> theta = num_params (Eq. 5); 'uniform'; a comma-separated
  string or a sequence of floats (e.g. the released 7/20, 13/20, 70/90).
  """
  m = len(num_params)
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    w = np.asarray(num_params, dtype=np.float64)
  elif isinstance(spec, str) and spec.strip() == "uniform":
    w = np.ones(m, dtype=np.float64)
  else:
    if isinstance(spec, str):
      spec = [_parse_float(s) for s in spec.split(",")]
    w = np.asarray(spec, dtype=np.float64)
  if w.shape != (m,):
    raise ValueError(f"{w.size} weights given for {m} models")
  if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
    raise ValueError(f"weights must be finite, >= 0, with a positive sum: {w}")
  return w


def _parse_float(s: str) -> float:
  s = s.strip()
  if "/" in s:  # allow the released '7/20' style
    num, den = s.split("/")
    return float(num) / float(den)
  return float(s)


def scores(
    probs_nmk5,
    mode: str = "paper",
    level: str = "sentence",
    alpha: float = 0.2,
    prompt_index: int = 0,
    weights=None,
) -> dict:
  """All score levels for probs [N, M, K, 5].

  Returns a dict of arrays: 'token' [N, M, K], 'sentence' [N, M], 'model' [N]
  (only when M > 1, or when level == 'model') and 'score' [N], the one the
  selected level ranks by. token/sentence levels need a single model
  (M == 1): combining models is what the model level is for.
  weights: [M] floats or None (uniform); resolve θ with resolve_weights().
  """
  _check_mode(mode)
  if level not in LEVELS:
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
  probs = jnp.asarray(probs_nmk5)
  if probs.ndim != 4:
    raise ValueError(f"expected probs [N, M, K, R], got {probs.shape}")
  check_scale(probs.shape[-1], mode)
  _, m, k, _ = probs.shape
  if not 0 <= prompt_index < k:
    raise ValueError(f"prompt_index {prompt_index} out of range for K={k}")
  out = {}
  out["token"] = token_scores(probs, mode)
  out["sentence"] = sentence_scores(out["token"], alpha)
  if m > 1 or level == "model":
    w = jnp.ones((m,), probs.dtype) if weights is None else weights
    out["model"] = model_scores(out["sentence"], w)
  if level in ("token", "sentence") and m != 1:
    raise ValueError(
        f"level={level!r} needs one model, got {m}; " "use level='model' to combine models"
    )
  if level == "token":
    out["score"] = out["token"][:, 0, prompt_index]
  elif level == "sentence":
    out["score"] = out["sentence"][:, 0]
  else:
    out["score"] = out["model"]
  return out
