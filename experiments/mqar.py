"""Experiment 1: multi-query associative recall (MQAR, Zoology style) across the model families.

    python experiments/mqar.py                  # minimum credible version (one H100)
    python experiments/mqar.py --full           # width x (T, N) grid
    python experiments/mqar.py --quick          # CPU pipeline check (5-15 s a model on 2 cores)
    python experiments/mqar.py --plot-only [--out DIR]
    options: --out DIR, --workers N, --steps S, --time-limit SEC, --fresh, --models a,b,
             --widths, --points T:N, --lrs, --batch, --vocab, --eval-examples, --impl, --conv-init

Task (experiments.md 1; the generator is `efficient_lm.data.mqar.MQARSource`, Zoology's
`multiquery_ar`): vocab 8192; a sequence of T tokens holds N key-value pairs (keys from the lower
half of the vocabulary, values from the upper half), then queries that repeat every key at
power-law distributed gaps (p(gap) ~ gap^-0.99, Zoology's a = 0.01), random filler elsewhere.
Loss and accuracy count only the token after each queried key (its value). Training batches
come from a vectorised copy of that generator (`mqar_batch`: the same distribution, Gumbel-top-k
for the gaps; the per-example source costs 18 ms a batch, more than a GPU step); the evaluation
set is 1024 examples of `MQARSource` itself (split 1, disjoint stream), the same for all models.

Models: 2 layers, width d, heads d/64: softmax attention (Transformer++), linear attention
(elu+1 feature map; recorded as missing if the block kind is absent), GLA (FLA's defaults: no short
conv), GLA with FLA's optional short convs on q, k, v (the token shift recall needs), DeltaNet, Rodimus
(mem 64), Rodimus+ (sliding window 16, far below the typical recall distance: the fraction of
queries whose key lies inside the window is stored in meta), DiJiang from scratch. AdamW
(b2 0.95, wd 0.1, clip 1), warmup 10%, cosine to 0.1x; bf16 compute on GPU, float32 params.
Each model trains at 3 learning rates (3e-3 first, then 1e-3 and 1e-2, so that a time limit cuts
the least likely best), one seed; the table and plot report the best accuracy over them.
Budget: Zoology's batch 256 and a fresh training stream (no repeated examples); 2000 steps =
512k examples, about a sixth of Zoology's 32 epochs over 100k (the sanity run on CPU: a 2-layer
width-64 transformer at T=64, N=4, vocab 256 reached 99.7% after 750 steps of 64).

Versions:
- minimum credible (default): width 128, T=256, N=32, 8 models x 3 lrs, 2000 steps of batch 256
  (131M tokens per run).
- `--full`: widths 64, 128, 256, 512 x (T, N) in {256, 512} x {16, 32, 64}: 168 model
  configurations, 504 runs.
- `--quick`: width 32, T=64, N=4, vocab 1024, 30 steps, scan recurrences, in-process (CPU).

Concurrency: independent model configurations run as concurrent worker processes (default 8,
one per model; `--workers`), each with 0.9/8 of the GPU memory; one compiled step per process
serves its 3 learning rates (lr lives in the optimizer state). See experiments/lmrun.py for why
processes rather than vmap.

Time on one H100 (estimate, not measured: these machines were not used to write this): minimum
version about 5-7 minutes (per process: ~10 s start, 20-60 s compile, then 3 x 2000 steps; the
21 runs need an estimated 3-5 ms of GPU each step, 130-210 s in all, interleaved across the 7
processes); run it with `--time-limit 540` under a 10-minute command limit. The full grid is
24x the runs, and width 512 / T 512 steps cost several times more: about 3-4 hours; run it in
pieces (`--widths`, `--points`, `--time-limit`), each piece resumes from the results file.
Results: `experiments/results/mqar/mqar.json` = {"meta", "rows"}, rows one per (model, width,
T, N, lr), written as each run finishes (a cut-off run keeps what finished; rerunning skips
finished rows unless `--fresh`), and `mqar.png`.
"""
from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from experiments import lmrun  # noqa: E402
from experiments.common import (  # noqa: E402
    experiment_parser, read_json, results_and_pyplot, run_meta, version_of, write_json)

NAME = "mqar"
FILE = "mqar.json"
PNG = "mqar.png"
LONG_DIR = "long"   # the same grid trained longer, a results file of its own (README: after the main table)
MODELS = ("transformer", "linear_attention", "gla", "gla_conv", "deltanet", "rodimus", "rodimus_plus", "dijiang")
LABELS = {"transformer": "softmax attention", "linear_attention": "linear attention", "gla": "GLA",
          "gla_conv": "GLA + short conv",
          "deltanet": "DeltaNet", "rodimus": "Rodimus", "rodimus_plus": "Rodimus+",
          "dijiang": "DiJiang"}
ROW_KEYS = ("model", "width", "seq_len", "n_pairs", "lr", "accuracy", "loss", "steps", "wall_s")

VERSIONS = {
    "quick": dict(widths=(32,), points=((64, 4),), lrs=(3e-3,), steps=30, batch=16, vocab=1024,
                  eval_examples=32, impl="scan", window=8, mem_size=16, workers=0, log_every=10),
    "min": dict(widths=(128,), points=((256, 32),), lrs=(3e-3, 1e-3, 1e-2), steps=2000, batch=256,
                vocab=8192, eval_examples=1024, impl="auto", window=16, mem_size=64, workers=8,
                log_every=250),
    "full": dict(widths=(64, 128, 256, 512), points=((256, 16), (256, 32), (256, 64), (512, 16),
                                                     (512, 32), (512, 64)),
                 lrs=(3e-3, 1e-3, 1e-2), steps=2000, batch=256, vocab=8192, eval_examples=1024,
                 impl="auto", window=16, mem_size=64, workers=8, log_every=250),
}
VERSION_NAMES = {"quick": "quick (CPU pipeline check)", "min": "minimum credible", "full": "full"}
POWER_A = 0.01


# ------------------------------------------------------------------ data


def mqar_batch(rng: np.random.Generator, batch: int, seq_len: int, n_pairs: int, vocab: int,
               power_a: float = POWER_A, random_non_queries: bool = True) -> dict:
  """A batch of MQAR examples from the distribution of `efficient_lm.data.mqar.MQARSource`,
  vectorised: distinct keys in [1, V/2), distinct values in [V/2, V), the query of key j at
  context + 2 * gap_j with gaps drawn without replacement from p(g) ~ a (g+1)^(a-1) in the
  order they are drawn (Gumbel-top-k), targets only after each query."""
  b, t, n, v = batch, seq_len, n_pairs, vocab
  half = v // 2
  context = 2 * n
  space = (t - context) // 2
  if space < n or v < 4 * n + 2:
    raise ValueError(f"MQAR: T={t}, N={n}, V={v} do not fit")

  def distinct(lo, hi):
    """n distinct ints from [lo, hi) per row, in random order: draws with replacement, the
    first occurrences kept in draw order (= sequential sampling without replacement)."""
    k = 2 * n + 8
    c = rng.integers(lo, hi, (b, k))
    order = np.argsort(c, axis=1, kind="stable")
    sc = np.take_along_axis(c, order, 1)
    first_sorted = np.ones_like(sc, bool)
    first_sorted[:, 1:] = sc[:, 1:] != sc[:, :-1]
    first = np.zeros_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, 1)
    pick = np.argsort(~first, axis=1, kind="stable")[:, :n]   # the first n first-occurrences
    out = np.take_along_axis(c, pick, 1)
    for i in np.nonzero(first.sum(1) < n)[0]:   # fewer than n distinct draws: vanishingly rare
      out[i] = rng.choice(np.arange(lo, hi), n, replace=False)
    return out

  keys, values = distinct(1, half), distinct(half, v)
  logp = (power_a - 1) * np.log(np.arange(1, space + 1, dtype=np.float64))
  gumbel = -np.log(-np.log(rng.random((b, space))))
  gaps = np.argsort(-(logp + gumbel), axis=1)[:, :n]
  rows = np.arange(b)[:, None]
  seq = np.zeros((b, t + 1), np.int64)
  seq[:, 0:context:2], seq[:, 1:context:2] = keys, values
  seq[rows, context + 2 * gaps] = keys
  labels = np.full((b, t + 1), -1, np.int64)
  labels[rows, context + 2 * gaps + 1] = values
  inputs, targets = seq[:, :-1], labels[:, 1:]
  if random_non_queries:
    zero = inputs == 0
    inputs[zero] = rng.integers(1, v, size=int(zero.sum()))
  mask = targets >= 0
  return {"inputs": inputs.astype(np.int32), "targets": np.where(mask, targets, 0).astype(np.int32),
          "segment_ids": None, "loss_mask": mask.astype(np.float32)}


def eval_batches(seq_len, n_pairs, vocab, n_examples, batch, seed=0) -> list[dict]:
  """The fixed evaluation set: `MQARSource` split 1 (never seen in training), in batches."""
  from efficient_lm.data.mqar import MQARSource  # noqa: PLC0415
  src = MQARSource(vocab_size=vocab, seq_len=seq_len, num_kv_pairs=n_pairs, power_a=POWER_A,
                   seed=seed, split=1, num_examples=n_examples)
  ex = [src[i] for i in range(n_examples)]
  out = []
  for i in range(0, n_examples - batch + 1, batch):
    chunk = ex[i:i + batch]
    out.append({"inputs": np.stack([e["inputs"] for e in chunk]),
                "targets": np.stack([e["targets"] for e in chunk]),
                "segment_ids": None,
                "loss_mask": np.stack([e["loss_mask"] for e in chunk])})
  return out


def recall_distances(seq_len, n_pairs, vocab=8192, n=2048, seed=123) -> np.ndarray:
  """Distance (query position - key position) of every query of `n` generated examples."""
  rng = np.random.default_rng(seed)
  b = mqar_batch(rng, n, seq_len, n_pairs, vocab, random_non_queries=False)
  d = []
  for x, m in zip(b["inputs"], b["loss_mask"]):
    first = {}
    for pos in range(2 * n_pairs):
      if pos % 2 == 0:
        first[int(x[pos])] = pos
    for q in np.nonzero(m)[0]:
      d.append(q - first[int(x[q])])
  return np.asarray(d)


# ------------------------------------------------------------------ models


def available_models() -> tuple[list[str], list[str]]:
  """(present, missing) MODELS, each a `<model>-tiny` preset, in this checkout."""
  from efficient_lm.configs import PRESETS  # noqa: PLC0415
  present = [m for m in MODELS if f"{m}-tiny" in PRESETS]
  return present, [m for m in MODELS if m not in present]


def model_config(model: str, width: int, seq_len: int, v: dict, dtype: str):
  from efficient_lm.configs import get_config  # noqa: PLC0415
  heads = max(1, width // 64)
  over = dict(vocab_size=v["vocab"], d_model=width, n_layers=2, n_heads=heads,
              chunk_size=min(64, seq_len), impl=v["impl"], dtype=dtype, param_dtype="float32")
  if model in ("rodimus", "rodimus_plus"):
    over["mem_size"] = v["mem_size"]
  if model == "rodimus_plus":
    over["window"] = v["window"]
  if "conv_init" in v:
    over["conv_init"] = v["conv_init"]
  return get_config(f"{model}-tiny", **over)


def optim_config(steps: int):
  from efficient_lm.training.optim import OptimConfig  # noqa: PLC0415
  return OptimConfig(lr=1.0, warmup_steps=max(1, steps // 10), b2=0.95, weight_decay=0.1,
                     clip_norm=1.0)


def run_key(model, width, seq_len, n_pairs, lr) -> str:
  return f"{model}|{width}|{seq_len}|{n_pairs}|{lr:g}"


def work(task: dict, emit) -> None:
  """One (model, width, T, N): compile once, train at every lr of the task, one row each."""
  import jax  # noqa: PLC0415
  v = task["v"]
  emit({"kind": "device", **lmrun.device_meta()})
  cfg = model_config(task["model"], task["width"], task["seq_len"], v, lmrun.compute_dtype())
  trainer = lmrun.Trainer(cfg, optim_config(v["steps"]), v["steps"], seed=task["seed"])
  emit({"kind": "params", "model": task["model"], "width": task["width"], "params": trainer.n_params})
  evals = eval_batches(task["seq_len"], task["n_pairs"], v["vocab"], v["eval_examples"], v["batch"],
                       seed=task["seed"])
  deadline = task.get("deadline")
  for lr in task["lrs"]:
    if deadline is not None and time.time() > deadline:
      emit({"kind": "skipped", "lr": lr, "reason": "time limit"})
      continue
    rng = np.random.default_rng([task["seed"], task["seq_len"], task["n_pairs"]])  # same stream for all
    nb = lambda s: mqar_batch(rng, v["batch"], task["seq_len"], task["n_pairs"], v["vocab"])
    t0 = time.time()
    try:
      rec, _ = trainer.fit(lr, nb, evals, log_every=v["log_every"], deadline=deadline,
                        log=lambda m: print(m, flush=True))
    except Exception as e:  # keep the other learning rates
      emit({"kind": "failed", "lr": lr, "error": f"{type(e).__name__}: {e}"[:1000]})
      continue
    print(f"  {task['id']} lr {lr:g}: accuracy {rec['eval_accuracy']:.4f} loss {rec['eval_loss']:.4f} "
          f"({rec['steps']} steps, {rec['wall_s']} s, {rec['step_s'] or 0:.4f} s/step)", flush=True)
    row = {"model": task["model"], "width": task["width"], "seq_len": task["seq_len"],
           "n_pairs": task["n_pairs"], "lr": float(lr), "accuracy": float(rec["eval_accuracy"]),
           "loss": float(rec["eval_loss"]), "steps": int(rec["steps"]),
           "wall_s": round(time.time() - t0, 2)}
    emit({"kind": "row", "row": row,
          "detail": {"key": run_key(task["model"], task["width"], task["seq_len"], task["n_pairs"], lr),
                     "params": trainer.n_params, "compile_s": rec["compile_s"], "step_s": rec["step_s"],
                     "nonfinite_steps": rec["nonfinite_steps"],
                     "final_train_accuracy": rec["train_curve"][-1][2] if rec["train_curve"] else None,
                     "tokens": rec["steps"] * v["batch"] * task["seq_len"]}})
  jax.clear_caches()


# ------------------------------------------------------------------ orchestration


def parse(argv):
  p = experiment_parser(__doc__, quick_help="CPU-sized pipeline check", full_help="the width x (T, N) grid")
  lmrun.add_pool_args(p)
  p.add_argument("--lrs", default=None, help="comma-separated learning rates")
  p.add_argument("--widths", default=None, help="comma-separated widths")
  p.add_argument("--points", default=None, help="T:N pairs, e.g. 256:32,512:64")
  p.add_argument("--batch", type=int, default=None, help="training batch size")
  p.add_argument("--vocab", type=int, default=None, help="vocabulary size")
  p.add_argument("--eval-examples", type=int, default=None, help="size of the evaluation set")
  p.add_argument("--impl", default=None, help="recurrence form (scan, chunk, pallas, auto)")
  p.add_argument("--conv-init", default=None, choices=("normal", "torch"),
                 help="the q/k/v short convs' init (ModelConfig.conv_init; default the config's, 'normal')")
  return p.parse_args(argv)


def settings(args) -> dict:
  v = dict(VERSIONS[version_of(args)])
  if args.steps:
    v["steps"] = args.steps
  if args.lrs:
    v["lrs"] = tuple(float(x) for x in args.lrs.split(","))
  if args.widths:
    v["widths"] = tuple(int(x) for x in args.widths.split(","))
  if args.points:
    v["points"] = tuple(tuple(int(y) for y in x.split(":")) for x in args.points.split(","))
  for name in ("batch", "vocab", "eval_examples", "impl", "conv_init"):
    if getattr(args, name) is not None:
      v[name] = getattr(args, name)
  if args.workers is not None:
    v["workers"] = args.workers
  return v


# settings that change what a row means: a resume under others would mix rows of two setups
RESUME_SETTINGS = ("impl", "conv_init", "batch", "vocab", "eval_examples")


def check_resumable(previous: dict, v: dict, out: str) -> None:
  changed = {k: (previous.get(k), v.get(k)) for k in RESUME_SETTINGS if previous.get(k) != v.get(k)}
  if changed:
    said = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in changed.items())
    raise SystemExit(f"--out {out}: its rows were trained with {said}; pass --fresh to replace them "
                     "or another --out to keep both")


def main(argv=None) -> dict | None:
  args = parse(argv)
  out = lmrun.pool_script_start(args, NAME, work, plot)
  if out is None:
    return None
  version = version_of(args)
  v = settings(args)
  if v["workers"] > 0:
    lmrun.parent_on_cpu()
  started = time.time()
  present, missing = available_models()
  models = present if not args.models else [m for m in args.models.split(",") if m in present]
  path = os.path.join(out, FILE)
  old = read_json(path) if os.path.exists(path) and not args.fresh else None
  if old is not None and old.get("meta", {}).get("version") != version:
    old = None
  if old is not None:
    check_resumable(old["meta"].get("settings", {}), v, out)
  rows = list(old["rows"]) if old else []
  details = dict(old["meta"].get("run_details", {})) if old else {}
  done = {run_key(r["model"], r["width"], r["seq_len"], r["n_pairs"], r["lr"]) for r in rows
          if r["steps"] >= v["steps"]}   # a run cut short by a time limit is trained again
  dist = {f"{t}:{n}": recall_distances(t, n, v["vocab"], n=256) for t, n in v["points"]}
  meta = run_meta(seed=args.seed, started=started, version=version, version_name=VERSION_NAMES[version],
                  settings={k: val for k, val in v.items() if k != "workers"}, workers=v["workers"],
                  models=models, missing_models=missing,
                  params=dict(old["meta"].get("params", {})) if old else {},
                  recall_distance={k: {"median": float(np.median(d)), "min": int(d.min()),
                                       "max": int(d.max()),
                                       "within_rodimus_plus_window": float(np.mean(d <= v["window"]))}
                                   for k, d in dist.items()},
                  failed=[], run_details=details)
  if missing:
    print(f"models missing from this checkout (recorded in meta.missing_models): {missing}")
  tasks = []
  for t, n in v["points"]:
    for width in v["widths"]:
      for m in models:
        lrs = [lr for lr in v["lrs"] if run_key(m, width, t, n, lr) not in done]
        if lrs:
          tasks.append({"id": f"{m}_d{width}_T{t}_N{n}", "model": m, "width": width, "seq_len": t,
                        "n_pairs": n, "lrs": lrs, "seed": args.seed, "v": v})
  result = {"meta": meta, "rows": rows}

  def save():
    meta.update(run_meta(seed=args.seed, started=started))
    meta.update(device)
    meta["steps"] = v["steps"]
    meta["tokens_per_run"] = v["steps"] * v["batch"] * max(t for t, _ in v["points"])
    write_json(path, result)

  # the device facts come from the workers (this process may run on the CPU); kept on resume
  device = {k: old["meta"][k] for k in ("hardware", "platform", "jax") if old and k in old["meta"]}

  def on_record(task, rec):
    kind = rec.get("kind")
    if kind == "device":
      device.update({k: rec[k] for k in ("hardware", "platform", "jax")})
    elif kind == "params":
      meta["params"][f"{rec['model']}@{rec['width']}"] = rec["params"]
    elif kind == "row":
      row = {k: rec["row"][k] for k in ROW_KEYS}
      key = run_key(row["model"], row["width"], row["seq_len"], row["n_pairs"], row["lr"])
      rows[:] = [r for r in rows
                 if run_key(r["model"], r["width"], r["seq_len"], r["n_pairs"], r["lr"]) != key]
      rows.append(row)
      details[rec["detail"]["key"]] = rec["detail"]
      print(f"{row['model']:>16} d{row['width']} T{row['seq_len']} N{row['n_pairs']} lr {row['lr']:g}: "
            f"accuracy {row['accuracy']:.4f}", flush=True)
    elif kind in ("failed", "skipped"):
      meta["failed"].append({"task": task["id"], **{k: val for k, val in rec.items() if k != "kind"}})
    save()

  def on_failure(task, msg):
    print(f"task {task['id']} failed: {msg[-800:]}", flush=True)
    meta["failed"].append({"task": task["id"], "error": msg[-2000:]})
    save()

  print(f"MQAR {VERSION_NAMES[version]}: {len(tasks)} model configurations "
        f"({sum(len(t['lrs']) for t in tasks)} runs), {v['workers']} worker(s) -> {path}", flush=True)
  save()
  complete = lmrun.run_pool(tasks, script=os.path.abspath(__file__), out=out, workers=v["workers"],
                            work=work, on_record=on_record, on_failure=on_failure,
                            time_limit=args.time_limit, run_dir=args.runs_dir)
  meta["complete"] = bool(complete) and not meta["failed"]
  save()
  print(markdown(out))
  plot(out)
  return result


# ------------------------------------------------------------------ report


def best_rows(rows) -> dict:
  """(model, width, T, N) -> the row of the best accuracy over learning rates."""
  best = {}
  for r in rows:
    k = (r["model"], r["width"], r["seq_len"], r["n_pairs"])
    if k not in best or r["accuracy"] > best[k]["accuracy"]:
      best[k] = r
  return best


def markdown(results_dir: str) -> str:
  path = os.path.join(results_dir, FILE)
  if not os.path.exists(path):
    return f"(no MQAR results in {results_dir})\n"
  res = read_json(path)
  meta, rows = res.get("meta", {}), res.get("rows", [])
  best = best_rows(rows)
  cols = sorted({(k[2], k[3], k[1]) for k in best})
  models = [m for m in MODELS if any(k[0] == m for k in best)]
  s = meta.get("settings", {})
  head = (f"MQAR ({meta.get('version_name', meta.get('version', '?'))} version; "
          f"{meta.get('hardware', '?')}, {meta.get('date', '?')}; 2 layers, vocab {s.get('vocab')}, "
          f"{meta.get('steps')} steps of batch {s.get('batch')}, seed {meta.get('seed')}, "
          f"best of lr {', '.join(f'{x:g}' for x in s.get('lrs', []))}; wall {meta.get('wall_s', '?')} s"
          + ("" if meta.get("complete", False) else "; INCOMPLETE") + ")")
  lines = [head, "", "| model | " + " | ".join(f"T={t}, N={n}, d={w}" for t, n, w in cols) + " |",
           "|---|" + "---|" * len(cols)]
  for m in models:
    cells = []
    for t, n, w in cols:
      r = best.get((m, w, t, n))
      cells.append("-" if r is None else f"{r['accuracy']:.3f} (lr {r['lr']:g})")
    lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
  for m in meta.get("missing_models", []):
    lines.append(f"| {LABELS.get(m, m)} | " + " | ".join("missing" for _ in cols) + " |")
  lines.append("")
  rd = meta.get("recall_distance", {})
  if rd:
    lines.append("Recall distance (query - key position): " + "; ".join(
        f"T:N {k}: median {d['median']:.0f}, {100 * d['within_rodimus_plus_window']:.0f}% within the "
        f"Rodimus+ window {s.get('window')}" for k, d in rd.items()) + ".")
  if meta.get("note"):   # rows merged from a later run say so here
    lines += [meta["note"], ""]
  if meta.get("failed"):
    lines.append(f"Failed or skipped runs: {len(meta['failed'])} (see meta.failed).")
  lines.append("")
  longer = os.path.join(results_dir, LONG_DIR)
  if os.path.exists(os.path.join(longer, FILE)):
    lines += [f"Trained longer (`{LONG_DIR}/`, plot `{LONG_DIR}/{PNG}`):", "", markdown(longer)]
  return "\n".join(lines)


def plot(out: str) -> str | None:
  loaded = results_and_pyplot(out, FILE)
  if loaded is None:
    return None
  res, plt = loaded
  best = best_rows(res["rows"])
  points = sorted({(k[2], k[3]) for k in best})
  if not points:
    return None
  fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.6), squeeze=False)
  widths = sorted({k[1] for k in best})
  if len(widths) == 1:   # the minimum version: one width, so bars per model instead of lines
    for ax, (t, n) in zip(axes[0], points):
      ms = [m for m in MODELS if (m, widths[0], t, n) in best]
      acc = [best[(m, widths[0], t, n)]["accuracy"] for m in ms]
      ax.barh(range(len(ms)), acc, color=[f"C{MODELS.index(m)}" for m in ms])
      ax.set_yticks(range(len(ms)), [LABELS[m] for m in ms], fontsize=8)
      ax.invert_yaxis()
      ax.set_xlim(0, 1.0)
      for i, a_ in enumerate(acc):
        ax.text(min(a_ + 0.01, 0.9), i, f"{a_:.3f}", va="center", fontsize=7)
      ax.set_title(f"T={t}, N={n}, width {widths[0]}", fontsize=9)
      ax.set_xlabel("MQAR accuracy (best lr)")
  for ax, (t, n) in zip(axes[0], points if len(widths) > 1 else []):
    for m in MODELS:
      pts = sorted((k[1], r["accuracy"]) for k, r in best.items() if k[0] == m and k[2:] == (t, n))
      if pts:
        x, y = zip(*pts)
        ax.plot(x, y, "-o", ms=4, label=LABELS[m])
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"T={t}, N={n}", fontsize=9)
    ax.set_xlabel("model width")
  if len(widths) > 1:
    axes[0][0].set_ylabel("MQAR accuracy (best lr)")
    axes[0][-1].legend(fontsize=7)
  meta = res.get("meta", {})
  fig.suptitle(f"MQAR, {meta.get('version_name', '')} ({meta.get('hardware', '')})", fontsize=9)
  fig.tight_layout()
  png = os.path.join(out, PNG)
  fig.savefig(png, dpi=120)
  plt.close(fig)
  print(f"wrote {png}")
  return png


if __name__ == "__main__":
  main()
