"""Experiments 1-3 end to end in their --quick modes, the report, and the model's dropout.

The --quick runs train in this process on one CPU device (scan recurrences) into a tmp dir and
check the results file's schema; `run_pool` is checked with a worker script that needs no jax.
"""
import dataclasses
import math
import os
import textwrap

import jax
import numpy as np
import pytest

import efficient_lm
from efficient_lm import sharding as shd
from experiments import lmrun, mqar, report, shakespeare, wikitext2
from experiments.common import read_json, write_json
from tests.conftest import require_shared_data
from tests.training.helpers import small_run, with_train

# End-to-end runs (CPU-sized experiments / notebook kernels): the Python 3.11 CI leg runs them.
pytestmark = pytest.mark.slow

META_KEYS = {"hardware", "platform", "jax", "python", "command", "date", "seed", "wall_s", "version"}


def _has_matplotlib():
  try:
    import matplotlib  # noqa: F401
    return True
  except ImportError:
    return False


# ------------------------------------------------------------------ dropout


def _run(model="transformer-tiny", dropout=0.0, **train):
  cfg = small_run(**train)
  cfg = dataclasses.replace(cfg, model=model,
                            model_overrides={"d_model": 32, "n_heads": 2, "dropout": dropout})
  return cfg


def _setup(cfg):
  from efficient_lm.data.pipeline import Data
  from efficient_lm.training.loop import build, resolve_model_config
  data = Data(cfg.data)
  setup = build(cfg, resolve_model_config(cfg, data.vocab_size), shd.make_mesh(cfg.mesh, jax.devices()[:1]))
  batch = shd.global_batch(next(data.train_iterator(cfg.train.batch_size)), setup.batch_sharding)
  return setup, batch


def _two_steps(setup, batch):
  state, rest = setup.init()
  losses = []
  for _ in range(2):
    state, m = setup.train_step(state, batch, rest)
    losses.append(float(m["loss"]))
  ev = jax.device_get(setup.eval_step(state["params"], batch, rest))
  return losses, jax.device_get(state["params"]), ev


def test_dropout_config_is_validated():
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match="dropout"):
      efficient_lm.get_config("transformer-tiny", dropout=bad)
  assert efficient_lm.get_config("transformer-tiny").dropout == 0.0


@pytest.mark.parametrize("name", ["transformer-tiny", "rodimus_plus-tiny", "dijiang-tiny", "smoe-tiny"])
def test_dropout_zero_is_bit_identical_and_eval_is_deterministic(name):
  tok = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  base = efficient_lm.create_model(name, impl="scan")
  ref = np.asarray(base(tok))
  # rate 0: a key changes nothing
  np.testing.assert_array_equal(np.asarray(base(tok, dropout_key=jax.random.key(1))), ref)
  # rate > 0 adds no parameters and, without a key (eval / decode), changes nothing
  drop = efficient_lm.create_model(name, impl="scan", dropout=0.3)
  np.testing.assert_array_equal(np.asarray(drop(tok)), ref)
  if name == "transformer-tiny":
    np.testing.assert_array_equal(np.asarray(drop.prefill(tok, 20)[0]),
                                  np.asarray(base.prefill(tok, 20)[0]))
  # with a key it drops, reproducibly
  a = np.asarray(drop(tok, dropout_key=jax.random.key(1)))
  b = np.asarray(drop(tok, dropout_key=jax.random.key(1)))
  c = np.asarray(drop(tok, dropout_key=jax.random.key(2)))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - ref).max() > 1e-3 and np.abs(a - c).max() > 1e-3


def test_dropout_in_the_train_step():
  setup0, batch = _setup(_run(dropout=0.0))
  losses0, params0, ev0 = _two_steps(setup0, batch)
  # dropout = 0 through the training loop's build: the same numbers twice
  assert _two_steps(setup0, batch)[0] == losses0
  setup1, _ = _setup(_run(dropout=0.3))
  losses1, params1, ev1 = _two_steps(setup1, batch)
  # training changes (the first step's loss already differs: same init, masks applied) ...
  assert abs(losses1[0] - losses0[0]) > 1e-4
  # ... reproducibly for a fixed seed ...
  again, params1b, _ = _two_steps(setup1, batch)
  assert again == losses1 and losses1[0] != losses1[1]
  for x, y in zip(jax.tree.leaves(params1), jax.tree.leaves(params1b)):
    np.testing.assert_array_equal(x, y)
  # evaluation is deterministic: the eval step of the dropout model on the dropout-free
  # model's parameters equals the dropout-free eval exactly
  state0, rest = setup0.init()
  e_a = jax.device_get(setup0.eval_step(state0["params"], batch, rest))
  e_b = jax.device_get(setup1.eval_step(state0["params"], batch, rest))
  assert float(e_a["ce"]) == float(e_b["ce"])


def test_dropout_with_grad_accumulation_is_reproducible():
  setup, batch = _setup(with_train(_run(dropout=0.2), grad_accum=2))
  a, _, _ = _two_steps(setup, batch)
  b, _, _ = _two_steps(setup, batch)
  assert a == b and all(math.isfinite(x) for x in a)


# ------------------------------------------------------------------ MQAR


def test_mqar_batch_matches_the_library_source():
  from efficient_lm.data.mqar import MQARSource
  t, n, v = 128, 8, 512
  b = mqar.mqar_batch(np.random.default_rng(0), 400, t, n, v)
  src = MQARSource(vocab_size=v, seq_len=t, num_kv_pairs=n)
  ex = [src[i] for i in range(400)]
  s = {k: np.stack([e[k] for e in ex]) for k in ("inputs", "targets", "loss_mask")}
  for x in (b, s):
    m = x["loss_mask"] > 0
    assert (m.sum(1) == n).all()
    keys = x["inputs"][:, 0:2 * n:2]
    vals = x["inputs"][:, 1:2 * n:2]
    assert (keys >= 1).all() and (keys < v // 2).all() and (vals >= v // 2).all()
    assert all(len(set(r)) == n for r in keys)
    for row in range(50):  # the target after each query is its key's value
      lut = dict(zip(keys[row], vals[row]))
      for q in np.nonzero(m[row])[0]:
        assert x["targets"][row, q] == lut[x["inputs"][row, q]]
  qb = np.nonzero(b["loss_mask"])[1].mean()
  qs = np.nonzero(s["loss_mask"])[1].mean()
  assert abs(qb - qs) < 2.0, (qb, qs)   # the power-law query positions agree


def test_mqar_quick_end_to_end(tmp_path):
  out = str(tmp_path)
  mqar.main(["--quick", "--out", out, "--models", "transformer"])
  res = read_json(os.path.join(out, "mqar.json"))
  assert set(res) == {"meta", "rows"}
  assert META_KEYS <= set(res["meta"])
  assert res["meta"]["version"] == "quick" and res["meta"]["complete"]
  assert len(res["rows"]) == 1 and res["meta"]["models"] == ["transformer"]
  types = {"model": str, "width": int, "seq_len": int, "n_pairs": int, "lr": float, "accuracy": float,
           "loss": float, "steps": int, "wall_s": float}
  for r in res["rows"]:
    assert set(r) == set(types)
    for k, t in types.items():
      assert isinstance(r[k], t), (k, r[k])
    assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["loss"]) and r["steps"] == 30
  assert "| softmax attention |" in mqar.markdown(out)
  assert "Trained longer" not in mqar.markdown(out)
  longer = os.path.join(out, mqar.LONG_DIR)   # a longer run's own file follows the main table
  os.makedirs(longer)
  write_json(os.path.join(longer, mqar.FILE), {"meta": res["meta"], "rows": [dict(res["rows"][0], steps=12000)]})
  md = mqar.markdown(out)
  assert md.index("Trained longer") > md.index("| softmax attention |") and md.count("| softmax attention |") == 2
  # a rerun resumes: nothing left to train, the rows stay
  mqar.main(["--quick", "--out", out, "--models", "transformer"])
  assert read_json(os.path.join(out, "mqar.json"))["rows"] == res["rows"]
  # a resume under another recurrence form or conv init would mix two setups' rows: refused
  for flag in (["--impl", "chunk"], ["--conv-init", "torch"]):   # the quick setting: scan, normal
    with pytest.raises(SystemExit, match=flag[0].lstrip("-").replace("-", "_")):
      mqar.main(["--quick", "--out", out, "--models", "transformer", *flag])
  assert read_json(os.path.join(out, "mqar.json"))["rows"] == res["rows"]
  if _has_matplotlib():
    assert os.path.exists(os.path.join(out, "mqar.png"))


# ------------------------------------------------------------------ char LM, WikiText-2


def test_shakespeare_quick_end_to_end(tmp_path):
  require_shared_data("tinyshakespeare.txt")
  out = str(tmp_path)
  shakespeare.main(["--quick", "--out", out, "--models", "transformer"])
  res = read_json(os.path.join(out, "shakespeare.json"))
  assert set(res) == {"meta", "rows"} and META_KEYS <= set(res["meta"])
  assert res["meta"]["data"]["vocab"] == 65
  (row,) = res["rows"]
  assert row["model"] == "transformer" and row["steps"] == 20 and row["dropout"] == 0.2
  assert math.isfinite(row["val_loss"]) and row["val_loss"] < math.log(65) + 0.5
  assert row["curve"]["eval"][-1][0] == 20 and len(row["curve"]["train"]) >= 2
  assert "Transformer++" in shakespeare.markdown(out)


def test_matched_sizes_for_the_reference_budget():
  v = shakespeare.VERSIONS["min"]
  specs = {s["model"]: s for s in shakespeare.model_specs(v, 65, shakespeare.MIN_MODELS)}
  target = specs["transformer"]["params"]
  assert abs(target - 10.65e6) < 0.1e6
  for s in specs.values():
    assert abs(s["params"] - target) <= 0.01 * target, s


def test_wikitext2_quick_end_to_end(tmp_path):
  require_shared_data("wikitext2.valid.txt", "wikitext2.test.txt", "gpt-neox-20b.tokenizer.json")
  out = str(tmp_path)
  wikitext2.main(["--quick", "--out", out, "--models", "transformer"])
  res = read_json(os.path.join(out, "wikitext2.json"))
  assert set(res) == {"meta", "rows"} and META_KEYS <= set(res["meta"])
  assert res["meta"]["data"]["tokenizer_vocab"] == 50277
  (row,) = res["rows"]
  assert row["test_ppl"] == pytest.approx(math.exp(row["test_loss"]))
  assert 1.0 < row["test_ppl"] < 60000
  assert "WikiText-2" in wikitext2.markdown(out)


# ------------------------------------------------------------------ the worker pool


def test_run_pool_streams_records_and_reports_failures(tmp_path):
  script = tmp_path / "w.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {lmrun.ROOT!r})
      from experiments import lmrun
      def work(task, emit):
        if task["id"] == "bad":
          raise SystemExit(3)
        for i in range(task["n"]):
          emit({{"kind": "row", "i": i, "mem": __import__("os").environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")}})
      lmrun.worker_main(sys.argv[sys.argv.index("--worker") + 1], work)
  """))
  got, failed = [], []
  ok = lmrun.run_pool([{"id": "a", "n": 3}, {"id": "b", "n": 2}, {"id": "bad"}], script=str(script),
                      out=str(tmp_path), workers=2, work=None,
                      on_record=lambda t, r: got.append((t["id"], r["i"], r["mem"])),
                      on_failure=lambda t, m: failed.append((t["id"], m)), log=lambda m: None)
  assert ok
  assert sorted(got) == [("a", 0, "0.450"), ("a", 1, "0.450"), ("a", 2, "0.450"), ("b", 0, "0.450"),
                         ("b", 1, "0.450")]
  assert [f[0] for f in failed] == ["bad"] and "exit code 3" in failed[0][1]


# ------------------------------------------------------------------ report


def _fixtures(root):
  meta = {"hardware": "1 x NVIDIA H100 80GB HBM3", "platform": "gpu", "date": "2026-11-20 10:00:00 UTC",
          "seed": 0, "wall_s": 400.0, "complete": True}
  os.makedirs(os.path.join(root, "mqar"))
  write_json(os.path.join(root, "mqar", "mqar.json"), {
      "meta": dict(meta, version="min", version_name="minimum credible", steps=4000,
                   settings={"vocab": 8192, "batch": 64, "lrs": [1e-3, 3e-3], "window": 16},
                   missing_models=["linear_attention"]),
      "rows": [{"model": m, "width": 128, "seq_len": 256, "n_pairs": 32, "lr": lr, "accuracy": acc,
                "loss": 0.1, "steps": 4000, "wall_s": 60.0}
               for m, lr, acc in (("transformer", 1e-3, 0.99), ("transformer", 3e-3, 0.97),
                                  ("gla", 1e-3, 0.41), ("gla", 3e-3, 0.52))]})
  os.makedirs(os.path.join(root, "shakespeare"))
  curve = {"train": [[250, 2.0], [500, 1.7]], "eval": [[250, 2.1], [500, 1.8]]}
  write_json(os.path.join(root, "shakespeare", "shakespeare.json"), {
      "meta": dict(meta, version="min", version_name="minimum credible",
                   settings={"batch": 64, "seq_len": 256, "lr": 1e-3, "dropout": 0.2}),
      "rows": [{"model": "transformer", "label": "Transformer++", "params": 10671744, "val_loss": 1.4801,
                "best_val_loss": 1.4790, "steps": 5000, "tokens": 81920000, "wall_s": 200.0, "curve": curve},
               {"model": "rodimus", "label": "Rodimus", "params": 10738336, "val_loss": 1.52,
                "best_val_loss": 1.51, "steps": 5000, "tokens": 81920000, "wall_s": 250.0, "curve": curve}]})


def test_report_renders_the_readme_section(tmp_path):
  root = str(tmp_path / "results")
  _fixtures(root)
  readme = tmp_path / "README.md"
  readme.write_text("# x\n\nbefore\n\n<!-- results:begin -->\nold text\n<!-- results:end -->\n\nafter\n")
  logs = []
  modules = report.MODULES + (("experiments.no_such_module", "Nothing"),)
  body = report.section(root, str(tmp_path), modules=modules, log=logs.append)
  new = report.render(readme.read_text(), body)
  assert "old text" not in new and new.startswith("# x\n\nbefore\n") and new.endswith("after\n")
  assert "minimum credible" in new and "1 x NVIDIA H100 80GB HBM3" in new and "2026-11-20" in new
  assert "| softmax attention | 0.990 (lr 0.001) |" in new
  assert "| GLA | 0.520 (lr 0.003) |" in new and "| linear attention | missing |" in new
  assert "| Transformer++ | 10.67M | 1.4790 | 1.4801 |" in new and "gap +0.0093" in new and "met" in new
  assert any("no_such_module" in m and "not present" in m for m in logs)
  assert any("wikitext2" in m and "no results" in m for m in logs)
  # main() rewrites in place and --check then passes
  assert report.main(["--readme", str(readme), "--results", root]) == 0
  assert report.main(["--readme", str(readme), "--results", root, "--check"]) == 0
  with pytest.raises(ValueError, match="markers|pair"):
    report.render("no markers here", body)
