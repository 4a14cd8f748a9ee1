"""Experiment 7: RMoE (one GRU router shared across layers) vs SMoE (a linear router per layer).

    python experiments/moe_routing.py            # minimum credible version (H100)
    python experiments/moe_routing.py --full     # longer training, 3 seeds
    python experiments/moe_routing.py --quick    # CPU-sized, seconds
    python experiments/moe_routing.py --plot-only [--out DIR]

Both models are the same Transformer++ with dropless top-k SwiGLU-expert MoE MLPs in every
layer; only the router differs (`router="linear"` vs `"recurrent"`, GRU of `router_dim`).
Minimum version: character Tiny Shakespeare (first 90% train, last 10% validation), d 256,
6 layers, 4 heads, 8 experts of hidden 256, top-2, RMoE router_dim 128, block 256, batch 32,
2000 steps (16.4M tokens), AdamW lr 2e-3 (beta2 0.99, wd 0.1, warmup 100, cosine to 0.1x),
load-balancing loss coefficient 0.001 (the library default), seeds 0 and 1 for each router.
`--full`: 5000 steps, seeds 0, 1, 2.

Measured, on every non-overlapping 256-character window of the validation split:
- validation loss per run; per router the mean and the seed spread (max - min). A difference
  smaller than the larger spread is reported as no difference;
- per layer: expert load (fraction of the top-k choices per expert), its entropy over log E
  (1 = perfectly balanced), max load / mean load, the Mixtral balance term E sum f_e P_e, and
  the mean per-token routing entropy H(softmax(router logits)) in nats;
- mutual information (nats) between consecutive layers' top-1 expert choices on the same token,
  the plug-in estimate from the E x E joint histogram, its normalised form MI / sqrt(H_l H_l+1),
  and a chance baseline (the same with layer l+1's choices shuffled across tokens);
- pairwise cosine similarity of the experts' weights within each layer (each expert flattened
  to [w_gate, w_up, w_down]): the mean and max over pairs;
- router overhead: the ratio of median training-step times (RMoE / SMoE), compile excluded.
Per-layer routing decisions come from the model's own routers: the analysis taps each MoE
layer's router call while running the unchanged forward pass (`routing_trace`).

Results: `experiments/results/moe_routing/moe_routing.json` (rewritten after every run, so a
cut-off run keeps the finished ones) and `moe_routing.png`. bf16 compute on GPU, float32 on CPU.

Time on one H100 (estimate, not measured yet): minimum version about 4-6 minutes (4 runs of
2000 steps at ~20-35 ms/step plus 2 compilations of ~30-60 s). A run that would end after
`--budget-s` (default 500 s) is not started; rerunning the same command keeps the finished runs
in --out and does the rest. `--full` (5000 steps, 3 seeds) about 20-25 minutes: run the same
command 3-4 times. `--quick`: ~25 s on 2 CPU cores.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import lmrun  # noqa: E402
from experiments.common import (  # noqa: E402
    experiment_parser, pyplot, read_json, results_dir, run_meta, version_of, write_json)

NAME = "moe_routing"
FILE = "moe_routing.json"
ROUTERS = ("linear", "recurrent")
LABEL = {"linear": "SMoE (linear router)", "recurrent": "RMoE (GRU router)"}

VERSIONS = {
    "quick": dict(d_model=64, n_layers=2, n_heads=4, n_experts=4, top_k=2, expert_hidden=64, router_dim=32,
                  seq_len=32, batch_size=8, steps=20, seeds=(0, 1), lr=3e-3, warmup=5, limit_chars=40000,
                  eval_windows=32, eval_every=0, log_every=10),
    "min": dict(d_model=256, n_layers=6, n_heads=4, n_experts=8, top_k=2, expert_hidden=256, router_dim=128,
                seq_len=256, batch_size=32, steps=2000, seeds=(0, 1), lr=2e-3, warmup=100, limit_chars=0,
                eval_windows=0, eval_every=500, log_every=50),
    "full": dict(d_model=256, n_layers=6, n_heads=4, n_experts=8, top_k=2, expert_hidden=256, router_dim=128,
                 seq_len=256, batch_size=32, steps=5000, seeds=(0, 1, 2), lr=2e-3, warmup=100, limit_chars=0,
                 eval_windows=0, eval_every=1000, log_every=50),
}


# ------------------------------------------------------------------ analysis (numpy, unit-tested)


def entropy(p, axis=-1) -> np.ndarray:
  """Shannon entropy in nats of distributions along `axis` (0 log 0 = 0)."""
  p = np.asarray(p, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return terms.sum(axis=axis)


def joint_histogram(a, b, n_a: int, n_b: int) -> np.ndarray:
  a, b = np.asarray(a, np.int64).ravel(), np.asarray(b, np.int64).ravel()
  if a.shape != b.shape:
    raise ValueError(f"choices of different lengths: {a.shape} vs {b.shape}")
  return np.bincount(a * n_b + b, minlength=n_a * n_b).reshape(n_a, n_b).astype(np.float64)


def mutual_information(a, b, n_a: int, n_b: int | None = None) -> dict:
  """Plug-in mutual information (nats) between two integer choice arrays over the same tokens.
  -> {"mi", "h_a", "h_b", "nmi" (MI / sqrt(H_a H_b), 0 when either entropy is 0)}."""
  n_b = n_a if n_b is None else n_b
  joint = joint_histogram(a, b, n_a, n_b)
  joint /= max(joint.sum(), 1.0)
  pa, pb = joint.sum(1), joint.sum(0)
  h_a, h_b, h_ab = float(entropy(pa)), float(entropy(pb)), float(entropy(joint.ravel()))
  mi = max(h_a + h_b - h_ab, 0.0)
  nmi = mi / math.sqrt(h_a * h_b) if h_a > 0 and h_b > 0 else 0.0
  return {"mi": mi, "h_a": h_a, "h_b": h_b, "nmi": nmi}


def load_stats(counts_E, prob_sum_E=None, n_tokens: float | None = None) -> dict:
  """Balance of one layer from its per-expert choice counts (and summed router probabilities).
  -> load fractions, their entropy over log E (1 = balanced), max / mean load, coefficient of
  variation, and (with prob_sum) the Mixtral term E * sum_e f_e P_e (1 = balanced at top-1)."""
  c = np.asarray(counts_E, np.float64)
  e = c.size
  frac = c / max(c.sum(), 1e-30)
  out = {"load_fraction": frac.tolist(),
         "load_entropy_norm": float(entropy(frac) / math.log(e)) if e > 1 else 1.0,
         "max_over_mean": float(frac.max() * e),
         "cv": float(frac.std() / frac.mean()) if frac.mean() > 0 else 0.0}
  if prob_sum_E is not None and n_tokens:
    f = c / n_tokens
    p = np.asarray(prob_sum_E, np.float64) / n_tokens
    out["balance_loss"] = float(e * np.sum(f * p))
  return out


def cosine_matrix(w_EP) -> np.ndarray:
  """Pairwise cosine similarity of the rows of [E, P]."""
  w = np.asarray(w_EP, np.float64)
  w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-30)
  return w @ w.T


def expert_similarity(*weights) -> dict:
  """Experts' weights (each [E, ...], concatenated per expert) -> mean / mean |.| / max of the
  off-diagonal pairwise cosine similarities."""
  flat = np.concatenate([np.asarray(w, np.float64).reshape(np.shape(w)[0], -1) for w in weights], axis=1)
  s = cosine_matrix(flat)
  off = s[~np.eye(s.shape[0], dtype=bool)]
  return {"mean_cos": float(off.mean()), "mean_abs_cos": float(np.abs(off).mean()), "max_cos": float(off.max())}


def seed_summary(values) -> dict:
  v = [x for x in values if x is not None]
  if not v:
    return {"mean": None, "spread": None, "n": 0}
  return {"mean": float(np.mean(v)), "spread": float(max(v) - min(v)), "n": len(v), "values": v}


# ------------------------------------------------------------------ routing from the model


class _RouterTap:
  """Stands in for an MoE layer's router inside a traced forward pass and records its logits."""

  def __init__(self, router, sink):
    self.router, self.sink = router, sink

  def __call__(self, h_ND, state, cell):
    logits, state = self.router(h_ND, state, cell)
    self.sink.append(logits)
    return logits, state


def make_routing_trace(graphdef, top_k: int):
  """-> jitted fn(params, rest, tokens_BT) -> per MoE layer: the top-k choices [L, N, k] (int32,
  best first) and the router probabilities [L, N, E] (float32). The forward pass is the
  model's own; each MoE layer's router output is recorded as it runs."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from efficient_lm.layers.moe import MoE, route

  def trace(params, rest, tokens_BT):
    model = nnx.merge(graphdef, params, rest)
    sink = []
    for blk in model.blocks:
      if isinstance(blk.mlp, MoE):
        blk.mlp.router = _RouterTap(blk.mlp.router, sink)
    model(tokens_BT)
    routed = [route(logits_NE, top_k) for logits_NE in sink]     # the layer's own routing rule
    probs = jnp.stack([r[0] for r in routed])                      # [L, N, E]
    idx = jnp.stack([r[1] for r in routed])                        # [L, N, k]
    return idx.astype(jnp.int32), probs

  return jax.jit(trace)


def routing_decisions(trace, params, rest, batches):
  """-> (top-k choices [L, N, k], probabilities [L, N, E]) over the masked tokens of `batches`."""
  import jax
  idx, probs = [], []
  for b in batches:
    keep = np.asarray(b["loss_mask"]).reshape(-1) > 0
    i, p = jax.device_get(trace(params, rest, b["inputs"]))
    idx.append(i[:, keep])
    probs.append(p[:, keep])
  return np.concatenate(idx, axis=1), np.concatenate(probs, axis=1)


def analyze(trainer, params, rest, cfg, val_batches, seed: int = 0) -> dict:
  """Routing and expert analyses of one trained model on the validation batches."""
  if getattr(trainer, "routing_trace", None) is None:   # compiled once per model shape
    trainer.routing_trace = make_routing_trace(trainer.graphdef, cfg.top_k)
  trace = trainer.routing_trace
  e = cfg.n_experts
  idx, probs = routing_decisions(trace, params, rest, val_batches)
  n_layers, n_tok = idx.shape[0], idx.shape[1]
  top1 = idx[..., 0]
  layers = []
  for l in range(n_layers):
    st = load_stats(np.bincount(idx[l].ravel(), minlength=e), probs[l].sum(0), n_tok)
    st.update(layer=l, token_entropy=float(entropy(probs[l]).mean()),
              top1_load_fraction=(np.bincount(top1[l], minlength=e) / n_tok).tolist())
    layers.append(st)
  rng = np.random.default_rng(seed)
  mi = []
  for l in range(n_layers - 1):
    m = mutual_information(top1[l], top1[l + 1], e)
    m["mi_shuffled"] = mutual_information(top1[l], rng.permutation(top1[l + 1]), e)["mi"]
    m["layers"] = [l, l + 1]
    mi.append(m)
  model = trainer.merge(params, rest)
  sim = []
  from efficient_lm.layers.moe import MoE
  for l, blk in enumerate(b for b in model.blocks if isinstance(b.mlp, MoE)):
    s = expert_similarity(blk.mlp.w_gate[...], blk.mlp.w_up[...], blk.mlp.w_down[...])
    s["layer"] = l
    sim.append(s)
  return {"tokens": n_tok, "layers": layers, "mi": mi, "similarity": sim,
          "mean_mi": float(np.mean([m["mi"] for m in mi])) if mi else None,
          "mean_nmi": float(np.mean([m["nmi"] for m in mi])) if mi else None,
          "mean_mi_shuffled": float(np.mean([m["mi_shuffled"] for m in mi])) if mi else None,
          "mean_cos": float(np.mean([s["mean_cos"] for s in sim])),
          "mean_abs_cos": float(np.mean([s["mean_abs_cos"] for s in sim])),
          "mean_load_entropy_norm": float(np.mean([x["load_entropy_norm"] for x in layers])),
          "mean_token_entropy": float(np.mean([x["token_entropy"] for x in layers]))}


# ------------------------------------------------------------------ the run


def model_config(v: dict, router: str, vocab_size: int, dtype: str):
  from efficient_lm.configs import ModelConfig, get_config
  return get_config(ModelConfig(kind="transformer", norm_eps=1e-6), vocab_size=vocab_size, d_model=v["d_model"],
                    n_layers=v["n_layers"], n_heads=v["n_heads"], n_experts=v["n_experts"], top_k=v["top_k"],
                    expert_hidden=v["expert_hidden"], router=router, router_dim=v["router_dim"],
                    dtype=dtype, param_dtype="float32")


def summarize(res: dict) -> dict:
  runs = [r for r in res.get("runs", []) if r.get("val_loss") is not None]
  out = {}
  for router in ROUTERS:
    rr = [r for r in runs if r["router"] == router]
    if not rr:
      continue
    key = lambda k: seed_summary([r.get("analysis", {}).get(k) for r in rr])
    out[router] = {"val_loss": seed_summary([r["val_loss"] for r in rr]),
                   "step_time_s": seed_summary([r.get("step_time_s") for r in rr]),
                   "mean_mi": key("mean_mi"), "mean_nmi": key("mean_nmi"),
                   "mean_mi_shuffled": key("mean_mi_shuffled"), "mean_cos": key("mean_cos"),
                   "mean_abs_cos": key("mean_abs_cos"), "mean_load_entropy_norm": key("mean_load_entropy_norm"),
                   "mean_token_entropy": key("mean_token_entropy"), "params": rr[0].get("params")}
  if all(r in out for r in ROUTERS):
    s, r = out["linear"], out["recurrent"]
    diff = r["val_loss"]["mean"] - s["val_loss"]["mean"]
    spread = max(s["val_loss"]["spread"], r["val_loss"]["spread"])
    out["rmoe_minus_smoe"] = diff
    out["seed_spread"] = spread
    if min(s["val_loss"]["n"], r["val_loss"]["n"]) < 2:
      out["verdict"] = "one seed per router: no claim"
    elif abs(diff) > spread:
      out["verdict"] = f"{'RMoE' if diff < 0 else 'SMoE'} lower by {abs(diff):.4f} (larger than the seed spread {spread:.4f})"
    else:
      out["verdict"] = f"difference {diff:+.4f} within the seed spread {spread:.4f}: no claim"
    if s["step_time_s"]["mean"] and r["step_time_s"]["mean"]:
      out["router_overhead"] = r["step_time_s"]["mean"] / s["step_time_s"]["mean"]
  return out


def run(version: str, out: str, routers=ROUTERS, seeds=None, fresh: bool = False, steps: int | None = None,
        budget_s: float | None = None, log=print) -> dict:
  """Trains and analyses every (seed, router) pair. Unless `fresh`, finished runs of the same
  version already in `out` are kept and not repeated (rerun the command to continue a cut-off run).
  `budget_s`: a run that would end past this many seconds (judged by the slowest finished run
  of this call) is not started; the rest is left for the next call."""
  from efficient_lm import create_model
  from efficient_lm.training.optim import OptimConfig

  started = time.time()
  v = dict(VERSIONS[version], **({"steps": steps} if steps else {}))
  seeds = tuple(v["seeds"] if seeds is None else seeds)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, FILE)
  data = lmrun.load_chars(limit_chars=v["limit_chars"])
  dtype = lmrun.compute_dtype()
  bs, t = v["batch_size"], v["seq_len"]
  val = lmrun.eval_windows(data.val, bs, t, v["eval_windows"])
  res = {"version": version,
         "config": {**{k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()}, "seeds": list(seeds),
                    "compute_dtype": dtype, "data": data.path, "train_chars": int(data.train.size),
                    "val_chars": int(data.val.size), "routers": list(routers)},
         "runs": []}
  kept = []
  if not fresh and os.path.exists(path):
    try:
      old = read_json(path)
    except ValueError:
      old = {}
    if old.get("version") == version and old.get("config", {}).get("steps") == v["steps"]:
      kept = [r for r in old.get("runs", []) if r.get("val_loss") is not None]
      res["runs"] = kept
      res["config"]["seeds"] = sorted({*seeds, *(r["seed"] for r in kept)})
      res["config"]["routers"] = sorted({*routers, *(r["router"] for r in kept)})
  done = {(r["router"], r["seed"]) for r in kept}

  def save(stage):
    res["summary"] = summarize(res)
    res["meta"] = run_meta(started=started, version=version, stage=stage, seeds=res["config"]["seeds"],
                           kept_runs=len(kept), tokens=sum(r.get("tokens", 0) for r in res["runs"]))
    write_json(path, res)

  ocfg = OptimConfig(lr=v["lr"], warmup_steps=v["warmup"], b2=0.99, weight_decay=0.1)
  trainers = {}
  walls = []
  stage = "done"
  for seed in seeds:                 # interleaved: a cut-off run still compares the routers
    for router in routers:
      if (router, seed) in done:
        log(f"{router} router, seed {seed}: kept from {path}")
        continue
      if budget_s and walls and time.time() - started + max(walls) > budget_s:
        stage = "stopped by the time budget"
        log(f"{router} router, seed {seed}: not started (time budget {budget_s:.0f} s); rerun the same "
            f"command to continue")
        continue
      t_run = time.time()
      cfg = model_config(v, router, data.vocab_size, dtype)
      res["config"]["aux_loss_coef"] = cfg.aux_loss_coef
      model = create_model(cfg, seed=seed)
      if router not in trainers:
        trainers[router] = lmrun.Trainer(model, ocfg, v["steps"], seed=seed)
      trainer = trainers[router]
      log(f"{router} router, seed {seed}: {trainer.n_params / 1e6:.2f}M parameters, {v['steps']} steps")
      rec = {"router": router, "seed": seed, "params": trainer.n_params}
      try:
        _, params, rest = lmrun.Trainer.split(model)
        fit, params = trainer.fit(v["lr"], lmrun.random_batches(data.train, bs, t, seed), val, params=params,
                                  rest=rest, eval_every=v["eval_every"], log_every=v["log_every"], log=log)
        rec.update(lmrun.val_record(fit, lr=v["lr"], seed=seed, batch_size=bs, seq_len=t))
        log(f"  done: val {rec['val_loss']:.4f}, {rec['step_time_s'] or float('nan'):.4f} s/step")
        rec["analysis"] = analyze(trainer, params, rest, cfg, val, seed=seed)
        a = rec["analysis"]
        log(f"  MI {a['mean_mi']:.4f} nats (shuffled {a['mean_mi_shuffled']:.4f}), expert cos {a['mean_cos']:.4f}, "
            f"load entropy {a['mean_load_entropy_norm']:.3f}")
      except Exception as e:  # keep the other runs
        rec.update(val_loss=None, error=f"{type(e).__name__}: {e}"[:500])
        log(f"  failed: {rec['error']}")
      res["runs"].append(rec)
      walls.append(time.time() - t_run)   # the first run of a router includes its compilation: conservative
      save(f"{router} seed {seed}")
  save(stage)
  return res


# ------------------------------------------------------------------ report


def _pm(s, nd=4):
  if not s or s.get("mean") is None:
    return "-"
  return f"{s['mean']:.{nd}f} ± {s['spread'] / 2:.{nd}f}" if s["n"] > 1 else f"{s['mean']:.{nd}f}"


def markdown(results_dir: str) -> str:
  """The README tables of this experiment from `results_dir/moe_routing.json`."""
  path = os.path.join(results_dir, FILE)
  if not os.path.exists(path):
    return f"(no MoE routing results in {results_dir})\n"
  res = read_json(path)
  meta, cfg, s = res.get("meta", {}), res.get("config", {}), summarize(res)
  lines = [
      f"RMoE vs SMoE ({res.get('version')} version; {meta.get('hardware', '?')}, {meta.get('date', '?')}; "
      f"char Tiny Shakespeare, d {cfg.get('d_model')} x {cfg.get('n_layers')} layers, {cfg.get('n_experts')} experts "
      f"(hidden {cfg.get('expert_hidden')}) top-{cfg.get('top_k')}, RMoE GRU dim {cfg.get('router_dim')}, "
      f"{cfg.get('steps')} steps of {cfg.get('batch_size')} x {cfg.get('seq_len')}, seeds {cfg.get('seeds')}, "
      f"{cfg.get('compute_dtype')}; wall {meta.get('wall_s', '?')} s"
      + ("; RUN INCOMPLETE: last stage " + str(meta.get("stage")) if meta.get("stage") != "done" else "") + ")",
      "",
      "Mean ± half the seed spread. MI: between consecutive layers' top-1 choices on validation tokens "
      "(nats; chance: the same with one layer shuffled). Expert cos: mean pairwise cosine of the experts' "
      "weights within a layer. Load entropy: of the expert load over log E (1 = balanced).",
      "",
      "| router | params | val loss | step ms | MI | MI chance | normalised MI | expert cos | load entropy | token entropy |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for router in ROUTERS:
    if router not in s:
      continue
    r = s[router]
    st = r["step_time_s"]
    step_ms = f"{1e3 * st['mean']:.1f}" if st.get("mean") else "-"
    lines.append(f"| {LABEL[router]} | {(r['params'] or 0) / 1e6:.2f}M | {_pm(r['val_loss'])} | {step_ms} | "
                 f"{_pm(r['mean_mi'])} | {_pm(r['mean_mi_shuffled'])} | {_pm(r['mean_nmi'], 3)} | "
                 f"{_pm(r['mean_cos'])} | {_pm(r['mean_load_entropy_norm'], 3)} | {_pm(r['mean_token_entropy'], 3)} |")
  lines.append("")
  if "verdict" in s:
    lines.append(f"Validation loss: {s['verdict']}."
                 + (f" Router overhead (RMoE / SMoE step time): {s['router_overhead']:.3f}x."
                    if s.get("router_overhead") else ""))
    lines.append("")
  # per layer, averaged over seeds
  per = {}
  for r in res.get("runs", []):
    a = r.get("analysis")
    if not a:
      continue
    for x in a["layers"]:
      per.setdefault((r["router"], x["layer"]), {}).setdefault("load", []).append(x["load_entropy_norm"])
      per[(r["router"], x["layer"])].setdefault("maxload", []).append(x["max_over_mean"])
    for m in a["mi"]:
      per.setdefault((r["router"], m["layers"][0]), {}).setdefault("mi", []).append(m["mi"])
    for x in a["similarity"]:
      per.setdefault((r["router"], x["layer"]), {}).setdefault("cos", []).append(x["mean_cos"])
  if per:
    n_layers = 1 + max(l for _, l in per)
    avg = lambda router, l, k: (lambda xs: "-" if not xs else f"{np.mean(xs):.3f}")(per.get((router, l), {}).get(k))
    lines += ["Per layer (mean over seeds; SMoE / RMoE):", "",
              "| layer | load entropy | max / mean load | MI(l, l+1) | expert cos |", "|---|---|---|---|---|"]
    for l in range(n_layers):
      cell = lambda k: f"{avg('linear', l, k)} / {avg('recurrent', l, k)}"
      lines.append(f"| {l} | {cell('load')} | {cell('maxload')} | {cell('mi')} | {cell('cos')} |")
    lines.append("")
  return "\n".join(lines)


def plot(out: str) -> str | None:
  plt = pyplot()
  if plt is None:
    print("matplotlib is not installed: no plot (run --plot-only where it is)")
    return None
  res = read_json(os.path.join(out, FILE))
  runs = [r for r in res.get("runs", []) if r.get("analysis")]
  color = {"linear": "tab:blue", "recurrent": "tab:red"}
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  ax = axes[0, 0]
  seeds = sorted({r["seed"] for r in res.get("runs", [])})
  dash = lambda seed: ("-", "--", ":", "-.")[seeds.index(seed) % 4]
  for r in res.get("runs", []):
    if r.get("train_curve"):
      x, y = zip(*r["train_curve"])
      ax.plot(x, y, dash(r["seed"]), color=color[r["router"]], alpha=0.4, lw=1)
    if r.get("val_curve"):
      x, y = zip(*r["val_curve"])
      ax.plot(x, y, "o" + dash(r["seed"]), color=color[r["router"]], ms=3,
              label=f"{LABEL[r['router']]} seed {r['seed']} (val; faint: train)")
  ax.set_xlabel("step"), ax.set_ylabel("loss (nats/char)"), ax.legend(fontsize=6)
  for ax, key, ylabel in ((axes[0, 1], "mi", "MI(top-1 at l, l+1), nats"),
                          (axes[1, 0], "similarity", "mean expert cosine similarity"),
                          (axes[1, 1], "layers", "load entropy / log E")):
    for r in runs:
      rows = r["analysis"][key]
      xs = [x["layers"][0] if key == "mi" else x["layer"] for x in rows]
      ys = [x["mi"] if key == "mi" else x["mean_cos"] if key == "similarity" else x["load_entropy_norm"] for x in rows]
      ax.plot(xs, ys, "o" + dash(r["seed"]), color=color[r["router"]], ms=3, label=f"{LABEL[r['router']]} s{r['seed']}")
      if key == "mi":
        ax.plot(xs, [x["mi_shuffled"] for x in rows], "x", color=color[r["router"]], ms=4)
    if key == "mi":
      ax.set_title("x: chance (layer l+1 shuffled)", fontsize=8)
    ax.set_xlabel("layer l"), ax.set_ylabel(ylabel), ax.legend(fontsize=6)
  meta = res.get("meta", {})
  fig.suptitle(f"RMoE vs SMoE ({res.get('version')}, {meta.get('hardware', '')})", fontsize=10)
  fig.tight_layout()
  path = os.path.join(out, "moe_routing.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv=None):
  ap = experiment_parser(__doc__, quick_help="CPU-sized version (seconds)", full_help="5000 steps, 3 seeds")
  ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the version's)")
  ap.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated: linear,recurrent")
  ap.add_argument("--fresh", action="store_true", help="ignore finished runs already in --out")
  ap.add_argument("--steps", type=int, default=None, help="training steps (default: the version's)")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="do not start a run that would end after this many seconds (default: 500, none for --quick)")
  args = ap.parse_args(argv)
  out = args.out or results_dir(NAME)
  os.makedirs(out, exist_ok=True)
  if not args.plot_only:
    version = version_of(args)
    seeds = None if args.seeds is None else [int(x) for x in args.seeds.split(",")]
    budget = args.budget_s if args.budget_s is not None else (None if args.quick else 500.0)
    run(version, out, routers=tuple(args.routers.split(",")), seeds=seeds, fresh=args.fresh, steps=args.steps,
        budget_s=budget)
  plot(out)
  print(markdown(out))


if __name__ == "__main__":
  main()
