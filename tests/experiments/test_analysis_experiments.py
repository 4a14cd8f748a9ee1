"""Experiments 5-7 (inference, DiJiang conversion, RMoE vs SMoE): the analysis functions on
hand-checked cases, the routing tap against the model's own routing statistics, the inference
prefill against `LM.prefill`, and each script's `--quick` end to end into a tmp dir (JSON schema,
`markdown()`). The quick runs are in-process (this process has 8 fake CPU devices, see conftest)."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import efficient_lm
from efficient_lm.layers.moe import load_balancing_loss
from experiments import dijiang_conversion, inference, moe_routing
from experiments.common import read_json
from experiments.moe_routing import cosine_matrix, entropy, expert_similarity, load_stats, mutual_information
from tests.conftest import require_shared_data

# End-to-end runs (CPU-sized experiments / notebook kernels): the Python 3.11 CI leg runs them.
pytestmark = pytest.mark.slow

# ------------------------------------------------------------------ analysis functions


def test_entropy_hand_checked():
  assert entropy([0.25] * 4) == pytest.approx(math.log(4))
  assert entropy([1.0, 0.0, 0.0]) == 0.0
  assert entropy([0.5, 0.5, 0.0]) == pytest.approx(math.log(2))
  np.testing.assert_allclose(entropy(np.array([[1.0, 0.0], [0.5, 0.5]])), [0.0, math.log(2)])


def test_mutual_information_of_identical_choices_is_their_entropy():
  a = np.random.default_rng(0).integers(0, 8, 5000)
  m = mutual_information(a, a, 8)
  h = entropy(np.bincount(a, minlength=8) / a.size)
  assert m["mi"] == pytest.approx(h) and m["h_a"] == pytest.approx(h)
  assert m["nmi"] == pytest.approx(1.0)
  # a relabelling (layer l+1 = a fixed permutation of layer l's choice) carries the same information
  assert mutual_information(a, (a + 3) % 8, 8)["mi"] == pytest.approx(h)


def test_mutual_information_of_independent_choices_is_zero():
  a, b = np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4)   # joint = product of uniforms exactly
  m = mutual_information(a, b, 4)
  assert abs(m["mi"]) < 1e-12 and m["h_a"] == pytest.approx(math.log(4)) and m["nmi"] < 1e-12
  # a constant layer: zero entropy, zero information, nmi defined as 0
  assert mutual_information(np.zeros(10, int), np.arange(10) % 3, 3) == pytest.approx(
      {"mi": 0.0, "h_a": 0.0, "h_b": entropy(np.bincount(np.arange(10) % 3) / 10), "nmi": 0.0})


def test_mutual_information_hand_checked_case():
  # joint p(a, b): (0,0) 1/2, (1,0) 1/4, (1,1) 1/4 -> MI = H(a) + H(b) - H(a, b)
  a, b = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
  h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  expected = math.log(2) + h_b - 1.5 * math.log(2)
  assert mutual_information(a, b, 2)["mi"] == pytest.approx(expected)
  assert expected == pytest.approx(0.2157615543388357)


def test_load_stats():
  e, k, n = 4, 2, 100
  bal = load_stats([n * k / e] * e, [n / e] * e, n)
  assert bal["load_entropy_norm"] == pytest.approx(1.0) and bal["max_over_mean"] == pytest.approx(1.0)
  assert bal["cv"] == pytest.approx(0.0) and bal["balance_loss"] == pytest.approx(k)   # Mixtral: k when balanced
  one = load_stats([n, 0, 0, 0])
  assert one["load_entropy_norm"] == 0.0 and one["max_over_mean"] == pytest.approx(e)
  assert one["load_fraction"] == [1.0, 0.0, 0.0, 0.0]


def test_expert_similarity():
  v = np.random.default_rng(1).normal(size=(3, 5))
  same = expert_similarity(np.stack([v, v, v]))
  assert same["mean_cos"] == pytest.approx(1.0) and same["max_cos"] == pytest.approx(1.0)
  ortho = expert_similarity(np.eye(4).reshape(4, 2, 2))
  assert ortho["mean_cos"] == pytest.approx(0.0) and ortho["mean_abs_cos"] == pytest.approx(0.0)
  opposite = expert_similarity(np.stack([v, -v]))
  assert opposite["mean_cos"] == pytest.approx(-1.0) and opposite["mean_abs_cos"] == pytest.approx(1.0)
  # the experts' matrices are concatenated per expert: [1, 0 | 1, 0] vs [1, 0 | 0, 1] -> cos 1/2
  g = np.array([[1.0, 0.0], [1.0, 0.0]])
  d = np.array([[1.0, 0.0], [0.0, 1.0]])
  assert expert_similarity(g, d)["mean_cos"] == pytest.approx(0.5)
  np.testing.assert_allclose(cosine_matrix([[3.0, 4.0], [4.0, 3.0]]), [[1.0, 0.96], [0.96, 1.0]])


def test_moe_summary_never_claims_a_win_inside_the_seed_spread():
  def runs(smoe, rmoe):
    return {"runs": [{"router": r, "seed": i, "val_loss": x, "step_time_s": 0.01 * (1 + (r == "recurrent"))}
                     for r, xs in (("linear", smoe), ("recurrent", rmoe)) for i, x in enumerate(xs)]}
  s = moe_routing.summarize(runs([1.50, 1.60], [1.48, 1.52]))
  assert s["rmoe_minus_smoe"] == pytest.approx(-0.05) and s["seed_spread"] == pytest.approx(0.10)
  assert "no claim" in s["verdict"] and s["router_overhead"] == pytest.approx(2.0)
  s = moe_routing.summarize(runs([1.50, 1.51], [1.40, 1.41]))
  assert s["verdict"].startswith("RMoE lower by 0.1000")
  assert "no claim" in moe_routing.summarize(runs([1.5], [1.0]))["verdict"]    # one seed each


def test_dijiang_summary_picks_best_lr_and_checks_the_target():
  res = {"teacher": {"val_loss": 1.50}, "converted_before": {"val_loss": 3.0},
         "finetune": [{"lr": 1e-3, "val_loss": 1.65}, {"lr": 3e-3, "val_loss": 1.58}, {"lr": 1e-2, "val_loss": None}],
         "scratch": [{"lr": 1e-3, "val_loss": 2.4}, {"lr": 3e-3, "val_loss": 2.3}]}
  s = dijiang_conversion.summarize(res)
  assert s["converted_after"] == 1.58 and s["converted_after_lr"] == 3e-3 and s["scratch_lr"] == 3e-3
  assert s["gap_after"] == pytest.approx(0.08) and s["target_met"] is True
  assert s["converted_minus_scratch"] == pytest.approx(-0.72)
  res["finetune"][1]["val_loss"] = 1.62
  assert dijiang_conversion.summarize(res)["target_met"] is False


# ------------------------------------------------------------------ the model taps and prefill


@pytest.mark.parametrize("name", ["smoe-tiny", "rmoe-tiny"])
def test_routing_tap_reproduces_the_models_routing_statistics(name):
  model = efficient_lm.create_model(name, impl="scan")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  logits, aux = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x, return_aux=True))(params, rest, tokens)
  trace = moe_routing.make_routing_trace(graphdef, model.config.top_k)
  idx, probs = trace(params, rest, tokens)
  n_moe = sum(model.config.is_moe_layer(i) for i in range(model.config.n_layers))
  e = model.config.n_experts
  assert idx.shape == (n_moe, 24, model.config.top_k) and probs.shape == (n_moe, 24, e)
  counts = jnp.sum(jax.nn.one_hot(idx, e), axis=(0, 1, 2))
  lb = load_balancing_loss(counts, jnp.sum(probs, axis=(0, 1)), float(n_moe * 24))
  np.testing.assert_allclose(float(lb), float(aux["moe_load_balance"]), rtol=1e-5)
  # the tap acts on a merged copy inside the trace: the model itself is unchanged
  assert all(type(b.mlp.router).__name__ in ("LinearRouter", "RecurrentRouter") for b in model.blocks)


@pytest.mark.parametrize("name", ["transformer-tiny", "deltanet-tiny", "rodimus_plus-tiny"])
def test_inference_prefill_matches_lm_prefill(name):
  graphdef, state = nnx.split(efficient_lm.create_model(name, impl="scan"))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 11)), jnp.int32)

  @jax.jit
  def both(state, tokens):
    model = nnx.merge(graphdef, state)
    return model.prefill(tokens, 16), inference.prefill_last(model, tokens, 16)

  (logits, cache), (last, cache2) = both(state, tokens)
  np.testing.assert_allclose(np.asarray(last), np.asarray(logits[:, -1]), rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), cache, cache2)


# ------------------------------------------------------------------ --quick end to end


@pytest.fixture(scope="module")
def quick_dirs(tmp_path_factory):
  return {}


def _quick(module, quick_dirs, tmp_path_factory, name):
  if name not in quick_dirs:
    out = str(tmp_path_factory.mktemp(name))
    module.main(["--quick", "--out", out])
    quick_dirs[name] = out
  return quick_dirs[name]


META_KEYS = {"hardware", "platform", "jax", "python", "command", "date", "wall_s"}


def test_inference_quick(quick_dirs, tmp_path_factory):
  out = _quick(inference, quick_dirs, tmp_path_factory, "inference")
  res = read_json(os.path.join(out, "inference.json"))
  assert res["version"] == "quick" and META_KEYS <= set(res["meta"]) and res["meta"]["stage"] == "done"
  rows = res["rows"]
  v = inference.VERSIONS["quick"]
  assert {(r["model"], r["batch"], r["context"]) for r in rows} == {
      (m, b, t) for m in inference.MODELS for b in v["batches"] for t in v["contexts"]}
  for r in rows:
    assert "error" not in r, r
    for k in ("prefill_s", "prefill_tok_s", "decode_ms_per_step", "decode_tok_s", "cache_mb", "params"):
      assert isinstance(r[k], (int, float)) and r[k] > 0, (k, r)
    assert "peak_mb" in r and r["peak_mb"] is None          # CPU: no device memory statistics
  cache = {(r["model"], r["context"]): r["cache_mb"] for r in rows if r["batch"] == v["batches"][0]}
  t0, t1 = v["contexts"]
  assert cache[("transformer", t1)] > cache[("transformer", t0)]          # the KV cache grows with context
  for m in ("rodimus", "rodimus_plus", "deltanet"):
    assert cache[(m, t1)] == cache[(m, t0)]                               # constant decode state
  md = inference.markdown(out)
  assert "quick version" in md and "| model | layers |" in md and md.count("\n| ") >= 1 + len(rows)


def test_dijiang_quick(quick_dirs, tmp_path_factory):
  require_shared_data("tinyshakespeare.txt")
  out = _quick(dijiang_conversion, quick_dirs, tmp_path_factory, "dijiang")
  res = read_json(os.path.join(out, "dijiang.json"))
  assert res["version"] == "quick" and META_KEYS <= set(res["meta"]) and res["meta"]["stage"] == "done"
  v = dijiang_conversion.VERSIONS["quick"]
  assert res["teacher"]["steps"] == v["teacher_steps"] and math.isfinite(res["teacher"]["val_loss"])
  assert math.isfinite(res["converted_before"]["val_loss"])
  # The default recipe: a fifth of the budget on attention transfer, the rest distilled from the teacher.
  transfer = v["ft_steps"] // 5
  assert transfer >= 1 and (res["config"]["transfer_steps"], res["config"]["objective"]) == (transfer, "kl")
  for kind, steps in (("finetune", v["ft_steps"] - transfer), ("scratch", v["ft_steps"])):
    assert [r["lr"] for r in res[kind]] == list(v["lrs"])
    assert all(math.isfinite(r["val_loss"]) and r["steps"] == steps for r in res[kind])
  s = res["summary"]
  assert {"teacher", "converted_before", "converted_after", "scratch", "gap_after", "target_met"} <= set(s)
  assert res["finetune"][0]["val_curve"][0] == [0, res["converted_before"]["val_loss"]]
  md = dijiang_conversion.markdown(out)
  assert "quick version" in md and f"+ {transfer} attention-transfer steps + KL-distilled" in md and "Target" in md


def test_dijiang_quick_cross_entropy_recipe(tmp_path):
  """`--objective ce --transfer-steps 0`: the plain fine-tune, the whole budget on cross-entropy."""
  require_shared_data("tinyshakespeare.txt")
  out = str(tmp_path)
  dijiang_conversion.main(["--quick", "--out", out, "--objective", "ce", "--transfer-steps", "0"])
  res = read_json(os.path.join(out, "dijiang.json"))
  v = dijiang_conversion.VERSIONS["quick"]
  assert (res["config"]["transfer_steps"], res["config"]["objective"]) == (0, "ce") and "transfer" not in res
  assert all(r["steps"] == v["ft_steps"] and math.isfinite(r["val_loss"]) for r in res["finetune"])
  assert "converted + fine-tuned" in dijiang_conversion.markdown(out)


def test_dijiang_quick_transfer_and_kl_variant(tmp_path):
  require_shared_data("tinyshakespeare.txt")
  out = str(tmp_path)
  dijiang_conversion.main(["--quick", "--out", out, "--transfer-steps", "2", "--objective", "kl"])
  res = read_json(os.path.join(out, "dijiang.json"))
  v = dijiang_conversion.VERSIONS["quick"]
  assert res["meta"]["stage"] == "done"
  cfg = res["config"]
  assert (cfg["transfer_steps"], cfg["objective"], cfg["transfer_lr"]) == (2, "kl", dijiang_conversion.TRANSFER_LR)
  assert res["transfer"]["steps"] == 2 and len(res["transfer"]["layers"]) == v["n_layers"]
  for r in res["finetune"]:   # the transfer steps come out of the fine-tune budget; the scratch keeps all of it
    assert (r["steps"], r["transfer_steps"], r["objective"]) == (v["ft_steps"] - 2, 2, "kl")
    assert r["val_curve"][:2] == [[0, res["converted_before"]["val_loss"]], [2, res["transfer"]["val_loss"]]]
    assert r["val_curve"][-1][0] == v["ft_steps"]
  assert all(r["steps"] == v["ft_steps"] for r in res["scratch"])
  losses = [res["teacher"]["val_loss"], res["converted_before"]["val_loss"], res["transfer"]["val_loss"]]
  losses += [x for r in res["finetune"] + res["scratch"] for _, x in r["val_curve"] + r["train_curve"]]
  assert all(math.isfinite(x) for x in losses)
  md = dijiang_conversion.markdown(out)
  assert f"| converted + 2 attention-transfer steps, no fine-tuning | {v['teacher_steps']} + 2 |" in md
  assert "| converted + 2 attention-transfer steps + KL-distilled from the teacher (best lr" in md
  assert f"| {v['teacher_steps']} + 2 + {v['ft_steps'] - 2} |" in md


def test_dijiang_variant_arguments_are_checked_before_any_run(tmp_path, capsys):
  out = tmp_path / "never"
  for argv, words in ((["--transfer-steps", "8"], "fewer than the fine-tune budget (8 steps)"),
                      (["--transfer-steps", "3", "--ft-steps", "3"], "fewer than the fine-tune budget (3 steps)"),
                      (["--transfer-steps", "-1"], "transfer steps must be an int >= 0"),
                      (["--objective", "mse"], "invalid choice: 'mse'")):
    with pytest.raises(SystemExit) as e:
      dijiang_conversion.main(["--quick", "--out", str(out), *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err, argv
  assert not out.exists()   # nothing written, no teacher trained
  with pytest.raises(ValueError, match="objective must be one of"):
    dijiang_conversion.run("quick", str(out), objective="KL")
  dijiang_conversion.check_variant(8, 7, "kl")   # the largest transfer that leaves one fine-tuning step


def test_dijiang_distillation_kl_hand_checked():
  from efficient_lm.interop import kl_to_teacher
  t = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
  s = jnp.log(jnp.array([[[0.25, 0.5, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
  # KL(t || s) = 0.5 ln 2 + 0.25 ln 0.5 on the first token, 0 on the second; the mask weighs tokens
  expected = 0.25 * math.log(2)
  assert float(kl_to_teacher(s, t, jnp.ones((1, 2)))) == pytest.approx(expected, rel=1e-5)
  assert float(kl_to_teacher(s.astype(jnp.bfloat16), t, jnp.array([[0.0, 1.0]]))) == pytest.approx(0.0, abs=1e-6)
  assert float(kl_to_teacher(t + 3.0, t, jnp.ones((1, 2)))) == pytest.approx(0.0, abs=1e-6)   # shift-invariant


def test_moe_routing_quick(quick_dirs, tmp_path_factory):
  require_shared_data("tinyshakespeare.txt")
  out = _quick(moe_routing, quick_dirs, tmp_path_factory, "moe")
  res = read_json(os.path.join(out, "moe_routing.json"))
  assert res["version"] == "quick" and META_KEYS <= set(res["meta"]) and res["meta"]["stage"] == "done"
  v = moe_routing.VERSIONS["quick"]
  assert sorted((r["router"], r["seed"]) for r in res["runs"]) == sorted(
      (r, s) for r in moe_routing.ROUTERS for s in v["seeds"])
  for r in res["runs"]:
    assert math.isfinite(r["val_loss"]) and r["step_time_s"] > 0, r
    a = r["analysis"]
    assert len(a["layers"]) == v["n_layers"] and len(a["mi"]) == v["n_layers"] - 1
    assert len(a["similarity"]) == v["n_layers"]
    for x in a["layers"]:
      assert sum(x["load_fraction"]) == pytest.approx(1.0) and 0 <= x["load_entropy_norm"] <= 1 + 1e-9
      assert 0 <= x["token_entropy"] <= math.log(v["n_experts"]) + 1e-6
    for m in a["mi"]:
      assert 0 <= m["mi"] <= min(m["h_a"], m["h_b"]) + 1e-9 and m["mi_shuffled"] >= 0
    for x in a["similarity"]:
      assert -1 <= x["mean_cos"] <= x["max_cos"] <= 1
  s = res["summary"]
  assert {"linear", "recurrent", "verdict", "seed_spread", "router_overhead"} <= set(s)
  md = moe_routing.markdown(out)
  assert "quick version" in md and "RMoE (GRU router)" in md and "Per layer" in md
  # rerunning keeps the finished runs instead of repeating them
  res2 = moe_routing.run("quick", out, log=lambda *_: None)
  assert [r["val_loss"] for r in res2["runs"]] == [r["val_loss"] for r in res["runs"]]


def test_markdown_without_results(tmp_path):
  for module in (inference, dijiang_conversion, moe_routing):
    assert module.markdown(str(tmp_path)).startswith("(no ")
