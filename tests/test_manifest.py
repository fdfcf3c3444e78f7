"""The score dir's contract: the typed manifest, merging runs, refusing other settings."""

import json

import pytest

from selectit_jax.data import prompts as prompts_lib
from selectit_jax.scoring import manifest as M

DATA = {"path": "/data/a.json", "format": "sharegpt", "turns": "first", "alpaca_input_sep": "\n\n"}
SETTINGS = {"model.dtype": "float32", "engine.max_tokens": 1024, "engine.too_long": "truncate"}


def _run(key="m@1", prompts=("a\n", "b\n"), limit=10, data=None, settings=None, scale=5):
  hashes = tuple(prompts_lib.prompt_hash(p) for p in prompts)
  return M.Manifest(
      data=dict(data or DATA),
      template=prompts_lib.DEFAULT_TEMPLATE,
      scale=scale,
      prompts=dict(zip(hashes, prompts)),
      models=[
          M.ModelEntry(
              key, key.split("@")[0], "/m", key.split("@")[1], 135, dict(settings or SETTINGS)
          )
      ],
      runs=[M.RunEntry(key, hashes, limit, limit)],
  )


def test_round_trip_and_version(tmp_path):
  m = _run()
  M.write(str(tmp_path), m)
  assert M.read(str(tmp_path)) == m
  assert json.load(open(M.path_in(str(tmp_path))))["version"] == M.VERSION
  assert M.read(str(tmp_path / "none")) is None


def test_runs_accumulate_models_prompts_and_coverage():
  """Two models, a later run with fewer prompts and a smaller limit: nothing narrows."""
  m = _run(limit=6).merged(_run(key="g@2", prompts=("a\n", "b\n", "c\n"), limit=6))
  m = m.merged(_run(prompts=("a\n",), limit=3))
  assert m.model_keys == ["m@1", "g@2"]
  assert list(m.prompts.values()) == ["a\n", "b\n", "c\n"]
  assert m.limit == 6 and m.data_config()["limit"] == 6
  assert m.merged(_run(limit=0)).limit == 0  # 0 = all records


@pytest.mark.parametrize(
    "other, named",
    [
        (dict(data=dict(DATA, path="/data/b.json")), "data.path: '/data/a.json' -> '/data/b.json'"),
        (dict(data=dict(DATA, turns="released")), "data.turns"),
        (
            dict(settings=dict(SETTINGS, **{"engine.max_tokens": 512})),
            "engine.max_tokens: 1024 -> 512",
        ),
        (dict(settings=dict(SETTINGS, **{"engine.too_long": "reject"})), "engine.too_long"),
        (dict(settings=dict(SETTINGS, **{"model.dtype": "bfloat16"})), "model.dtype"),
        (dict(scale=3), "prompts.scale: 5 -> 3"),
    ],
)
def test_other_settings_are_refused_by_name(other, named):
  with pytest.raises(ValueError, match=named.replace(".", r"\.").replace("(", r"\(")):
    _run().merged(_run(**other))


def test_other_settings_under_another_model_name_are_kept_apart():
  m = _run().merged(_run(key="m_bf16@1", settings=dict(SETTINGS, **{"model.dtype": "bfloat16"})))
  assert m.model_keys == ["m@1", "m_bf16@1"]


def test_version_1_manifest_is_upgraded(tmp_path):
  prompts = ["p1\n", "p2"]
  v1 = {
      "config": {"data": dict(DATA, path="", limit=8)},
      "data": {"path": "/data/a.json", "format": "sharegpt", "num_read": 8},
      "model": {"name": "m", "key": "m@ab", "fingerprint": "ab", "num_params": 7, "path": "/m"},
      "prompts": prompts,
      "template": prompts_lib.DEFAULT_TEMPLATE,
  }
  (tmp_path / "manifest.json").write_text(json.dumps(v1))
  m = M.read(str(tmp_path))
  assert m.model_keys == ["m@ab"] and m.models[0].num_params == 7
  assert m.prompt_hashes == [prompts_lib.prompt_hash(p) for p in prompts]
  assert m.data_config() == dict(DATA, limit=8)


def test_a_newer_or_broken_manifest_is_refused(tmp_path):
  (tmp_path / "manifest.json").write_text(json.dumps({"version": 99}))
  with pytest.raises(ValueError, match="newer"):
    M.read(str(tmp_path))
  (tmp_path / "manifest.json").write_text("{")
  with pytest.raises(ValueError, match="not a valid manifest"):
    M.read(str(tmp_path))
