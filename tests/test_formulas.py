"""formulas.py against hand-written numpy float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selectit_jax.selection import formulas

from conftest import CRAFTED, REF_TOKEN, ref_model, ref_sentence


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _rand_probs(rng, shape):
  # Dirichlet-like probabilities times a random digit mass in (0, 1].
  p = rng.gamma(0.5, size=shape + (5,))
  p /= p.sum(-1, keepdims=True)
  return p * rng.uniform(0.05, 1.0, size=shape + (1,))


@pytest.mark.parametrize("mode", formulas.MODES)
def test_token_crafted(mode):
  got = np.asarray(formulas.token_scores(jnp.asarray(CRAFTED), mode))
  want = np.array([REF_TOKEN[mode](p) for p in CRAFTED])
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_token_known_values_paper():
  # q = P/0.48 for row 0; base 4; spread = sum(q4 - qi) = 4*q4 - (1 - q4).
  q = CRAFTED[0] / CRAFTED[0].sum()
  want = 4 * (5 * q[3] - 1) / 4
  got = float(formulas.token_scores(jnp.asarray(CRAFTED[0])))
  assert got == pytest.approx(want, rel=1e-14)
  # argmax tie picks the first (rating 1): q=[.333,.333,.167,.083,.083]
  got = float(formulas.token_scores(jnp.asarray(CRAFTED[1])))
  assert got == pytest.approx(1 * (0 + 1 / 6 + 1 / 4 + 1 / 4) / 4, rel=1e-14)
  # tie 3/5 -> base 3; spread = .5+.5+0+.5+0 = 1.5
  got = float(formulas.token_scores(jnp.asarray(CRAFTED[2])))
  assert got == pytest.approx(3 * 1.5 / 4, rel=1e-14)
  # flat and one-hot 5
  assert float(formulas.token_scores(jnp.asarray(CRAFTED[3]))) == 0.0
  assert float(formulas.token_scores(jnp.asarray(CRAFTED[5]))) == pytest.approx(5.0)


def test_modes_differ_in_scale_and_order():
  paper = np.asarray(formulas.token_scores(jnp.asarray(CRAFTED), "paper"))
  code = np.asarray(formulas.token_scores(jnp.asarray(CRAFTED), "code"))
  # The second softmax flattens r, so code scores are much smaller.
  assert np.all(code[paper > 0] < paper[paper > 0])
  # One-hot 5 in code mode: r = [1,1,1,1,e]/(4+e); (5) * 4*(e-1)/(4+e) / 4.
  e = np.e
  assert code[5] == pytest.approx(5 * (e - 1) / (4 + e), rel=1e-14)


@pytest.mark.parametrize("mode", formulas.MODES)
def test_token_vectorized_random(mode):
  rng = np.random.default_rng(0)
  p = _rand_probs(rng, (6, 2, 3))
  got = np.asarray(formulas.token_scores(jnp.asarray(p), mode))
  want = np.array([REF_TOKEN[mode](v) for v in p.reshape(-1, 5)]).reshape(6, 2, 3)
  assert got.shape == (6, 2, 3)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", formulas.MODES)
def test_float32_agrees_with_float64(mode):
  rng = np.random.default_rng(1)
  p = _rand_probs(rng, (200,))
  want = np.array([REF_TOKEN[mode](v) for v in p])
  got32 = np.asarray(formulas.token_scores(jnp.asarray(p, jnp.float32), mode))
  assert got32.dtype == np.float32
  np.testing.assert_allclose(got32, want, rtol=1e-6, atol=1e-7)


def test_sentence_alpha_and_ddof0():
  tok = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
  for alpha in (0.0, 0.2, 1.0):
    got = np.asarray(formulas.sentence_scores(jnp.asarray(tok), alpha))
    want = [ref_sentence(t, alpha) for t in tok]
    np.testing.assert_allclose(got, want, rtol=1e-14)
  # Population std of 1..5 is sqrt(2) (sample std would be sqrt(2.5)).
  got = float(formulas.sentence_scores(jnp.asarray(tok[0]), 0.2))
  assert got == pytest.approx(3.0 / (1 + 0.2 * np.sqrt(2.0)), rel=1e-14)
  # alpha only penalises disagreement: equal means, the uneven row loses.
  s = np.asarray(formulas.sentence_scores(jnp.asarray(tok), 0.2))
  assert s[1] > s[0]
  s0 = np.asarray(formulas.sentence_scores(jnp.asarray(tok), 0.0))
  assert s0[0] == s0[1] == 3.0


def test_model_theta_and_explicit_weights():
  sent = np.array([[1.0, 2.0, 4.0], [3.0, 1.0, 0.5]])
  theta = formulas.resolve_weights("", [7_000_000_000, 13_000_000_000, 70_000_000_000])
  got = np.asarray(formulas.model_scores(jnp.asarray(sent), theta))
  want = [ref_model(s, [7, 13, 70]) for s in sent]
  np.testing.assert_allclose(got, want, rtol=1e-14)
  released = formulas.resolve_weights("7/20,13/20,70/90", [1, 1, 1])
  np.testing.assert_allclose(released, [0.35, 0.65, 70 / 90])
  got = np.asarray(formulas.model_scores(jnp.asarray(sent), released))
  want = [ref_model(s, [7 / 20, 13 / 20, 70 / 90]) for s in sent]
  np.testing.assert_allclose(got, want, rtol=1e-14)
  uni = formulas.resolve_weights("uniform", [5, 6, 7])
  np.testing.assert_allclose(
      np.asarray(formulas.model_scores(jnp.asarray(sent), uni)), sent.mean(-1), rtol=1e-14
  )
  np.testing.assert_allclose(formulas.resolve_weights([1, 2.5, 3], [1, 1, 1]), [1, 2.5, 3])
  with pytest.raises(ValueError):
    formulas.resolve_weights("1,2", [1, 1, 1])
  with pytest.raises(ValueError):
    formulas.resolve_weights("0,0,0", [1, 1, 1])
  with pytest.raises(ValueError):
    formulas.model_scores(jnp.asarray(sent), jnp.ones(2))


@pytest.mark.parametrize("mode", formulas.MODES)
def test_scores_helper_all_levels(mode):
  rng = np.random.default_rng(2)
  n, m, k = 4, 2, 5
  p = _rand_probs(rng, (n, m, k))
  w = np.array([135e6, 360e6])
  out = formulas.scores(p, mode=mode, level="model", alpha=0.3, weights=w)
  tok = np.array(
      [[[REF_TOKEN[mode](p[i, j, l]) for l in range(k)] for j in range(m)] for i in range(n)]
  )
  sent = np.array([[ref_sentence(tok[i, j], 0.3) for j in range(m)] for i in range(n)])
  model = np.array([ref_model(sent[i], w) for i in range(n)])
  np.testing.assert_allclose(out["token"], tok, rtol=1e-12)
  np.testing.assert_allclose(out["sentence"], sent, rtol=1e-12)
  np.testing.assert_allclose(out["model"], model, rtol=1e-12)
  np.testing.assert_allclose(out["score"], model, rtol=1e-12)

  one = p[:, :1]
  out = formulas.scores(one, mode=mode, level="sentence", alpha=0.3)
  assert "model" not in out and out["score"].shape == (n,)
  np.testing.assert_allclose(out["score"], sent[:, 0], rtol=1e-12)
  out = formulas.scores(one, mode=mode, level="token", prompt_index=3)
  np.testing.assert_allclose(out["score"], tok[:, 0, 3], rtol=1e-12)
  with pytest.raises(ValueError):
    formulas.scores(p, mode=mode, level="sentence")
  with pytest.raises(ValueError):
    formulas.scores(one, mode=mode, level="token", prompt_index=k)


def test_cell_reasons():
  p = np.array(
      [
          [0.1, 0.2, 0.3, 0.1, 0.1],
          [np.nan, 0.2, 0.3, 0.1, 0.1],
          [np.inf, 0.2, 0.3, 0.1, 0.1],
          [0.1, -0.2, 0.3, 0.1, 0.1],
          [0.0, 0.0, 0.0, 0.0, 0.0],
          [np.nan, -1.0, 0.0, 0.0, 0.0],
      ]
  )
  reasons = formulas.cell_reasons(p)
  assert list(reasons) == [
      "",
      "nonfinite_probs",
      "nonfinite_probs",
      "negative_probs",
      "zero_digit_mass",
      "nonfinite_probs",
  ]
  present = np.array([False, True, True, True, True, True])
  assert list(formulas.cell_reasons(p, present))[:2] == ["missing_scores", "nonfinite_probs"]
  assert formulas.cell_reasons(p.reshape(2, 3, 5)).shape == (2, 3)


def test_bad_mode_and_shape():
  with pytest.raises(ValueError):
    formulas.token_scores(jnp.ones(5), "nope")
  with pytest.raises(ValueError):
    formulas.token_scores(jnp.ones(1))  # a one-point scale
  with pytest.raises(ValueError):
    formulas.token_scores(jnp.ones(4), "code")  # the released scripts rate 1..5
  with pytest.raises(ValueError):
    formulas.scores(np.ones((2, 1, 1, 5)), level="nope")


@pytest.mark.parametrize("scale", [2, 3, 7])
def test_token_scores_on_other_scales(x64, scale):
  """Eq. 3 on ratings 1..R divides by R-1; code mode exists for R = 5 only."""
  rng = np.random.default_rng(scale)
  p = rng.gamma(0.7, size=(20, scale))
  got = np.asarray(formulas.token_scores(p, "paper"))
  for row, s in zip(p, got):
    q = row / row.sum()
    b = int(np.argmax(q))
    assert s == pytest.approx((b + 1) * np.abs(q - q[b]).sum() / (scale - 1), rel=1e-12)
  with pytest.raises(ValueError, match="five|5-point"):
    formulas.token_scores(p, "code")
  with pytest.raises(ValueError, match="2..9"):
    formulas.token_scores(np.ones((2, 10)), "paper")
