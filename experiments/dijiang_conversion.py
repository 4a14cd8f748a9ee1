"""Experiment 6: convert a trained softmax model to DiJiang attention and fine-tune it briefly.

    python experiments/dijiang_conversion.py            # minimum credible version (H100)
    python experiments/dijiang_conversion.py --full     # the longer teacher (the reference budget)
    python experiments/dijiang_conversion.py --quick    # CPU-sized, seconds
    python experiments/dijiang_conversion.py --plot-only [--out DIR]
    python experiments/dijiang_conversion.py --objective ce --transfer-steps 0 --seed 1 --out DIR   # CE fine-tuning

1. Teacher: a GPT-NeoX-style softmax transformer (LayerNorm, parallel residual, biased
   attention, GELU MLP 4d, partial RoPE 25%) on character Tiny Shakespeare (first 90% train,
   last 10% validation): d 384, 6 layers, 6 heads (10.7M parameters, the size of the
   experiments.md 2 reference GPT), block 256, batch 64, AdamW lr 1e-3 (beta2 0.99, wd 0.1,
   warmup 100, cosine to 0.1x), dropout 0.2 as nanoGPT's recipe (kept by the converted model),
   for 2000 steps (`--full`: 5000). Without dropout the teacher overfits from step ~750 on
   (measured on the H100: validation 1.53 at step 750, 2.60 at step 2000, train 0.38).
2. `efficient_lm.convert_to_dijiang` (q/k/v/dense, norms, MLP and embeddings copied; gate and
   GroupNorm new; fixed DCT projection), evaluated as converted. By default (`--calibrate`, ON)
   with learned per-head decays and `efficient_lm.interop.dijiang.calibrate_dijiang` on one
   training batch (16 windows): each head's decay fitted to the teacher's attention output, a
   constant gate, a moment-matched GroupNorm. It is the default because it was better in the CPU
   study (results/dijiang/cpu_study: gap after 5% of the steps +0.73 -> +0.36-0.40 nats at
   reduced scale); `--no-calibrate` is the previous init (random gate, unit GroupNorm, DiJiang's
   fixed decays unless `--learn-decay`). The scratch model shares the converted architecture
   (learned decays at their default init when calibrating).
3. Tune the converted model for 5% of the teacher's steps (100; `--full` 250) and train
   the same DiJiang architecture from scratch for the same steps; each at 3 learning rates
   (3e-4, 1e-3, 3e-3; warmup 10%), the best validation loss of each reported (the same
   selection for both). By default the first fifth of the budget (20 steps; `--full` 50) is
   attention transfer and the rest distillation (`--objective kl`); `--objective ce
   --transfer-steps 0` is plain cross-entropy fine-tuning. Measured on the H100 (min version, gap
   to the teacher after 100 steps): cross-entropy +0.124 / +0.122 (seeds 0 / 1); distillation
   alone +0.106 / +0.086; 20 transfer steps + distillation +0.074 / +0.084 and, rerun, +0.085 /
   +0.058 (results/dijiang/h100/, session 15), the only recipe under the 0.1 target at every
   seed, so the default. The CPU study had seen the same order at a smaller scale
   (cpu_study/README.md: 10 transfer + 40 distillation steps of 50 beat cross-entropy by
   0.03-0.04 nats, within its seed spread of 0.056).
   `--transfer-steps S` spends the first S steps of the budget on
   `efficient_lm.interop.transfer_attention` (every mixer trained to reproduce its teacher layer's
   attention output; lr 3e-3, batches of their own stream), once, before every lr's fine-tune of
   the remaining steps (S + the rest = the budget; the scratch model still trains the whole
   budget). `--objective kl` fine-tunes on KL(teacher || model) of the next-token distributions
   (`efficient_lm.interop.make_distill_step`; the teacher's forward each step is not charged,
   about a third more compute a step) instead of cross-entropy on the data; validation stays
   cross-entropy. One seed a process: run seeds as separate processes with their own `--out`.
Validation loss: mean cross-entropy (nats/char) over every non-overlapping 256-character window
of the validation split. Target reported against: converted within 0.1 nats of the teacher.

Results: `experiments/results/dijiang/dijiang.json` (written after every stage, so a cut-off run
keeps what finished) and `dijiang.png`. Compute bf16 on GPU (float32 master weights), float32 on CPU.

Time on one H100 (estimate, not measured yet): minimum version about 3-4 minutes (teacher
2000 steps ~1-1.5 min, 6 short runs of 100 steps, 2 compilations of ~20-40 s each);
`--full` about 6-8 minutes. `--quick`: about 20 s on 2 CPU cores. Measured: the minimum version
without calibration took 125 s wall on the H100; calibration itself took 4-6 s on 2 CPU cores at
the CPU study's scale (4 layers, 16 x 128 tokens, 14 decays a layer; one compilation); the
calibrated CE recipe took 177 s beside two MQAR processes on the H100 (session 13); the default
(transfer + KL, which compiles its own tuning step, the transfer step and the teacher's logits,
and computes a third more a tuning step) 191-196 s, two processes sharing the H100 (session 15).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments import lmrun  # noqa: E402
from experiments.common import (  # noqa: E402
    experiment_parser, pyplot, read_json, results_dir, run_meta, version_of, write_json)

NAME = "dijiang"
FILE = "dijiang.json"
TARGET_GAP = 0.1
OBJECTIVES = ("ce", "kl")
TRANSFER_LR = 3e-3   # the CPU study's best by held-out NMSE (cpu_study/transfer_lr_sweep.json)

VERSIONS = {
    # CPU-sized: seconds; the numbers mean nothing, the pipeline is what is checked.
    "quick": dict(d_model=64, n_layers=2, n_heads=4, seq_len=32, batch_size=8, teacher_steps=40,
                  ft_steps=8, lrs=(3e-3,), limit_chars=40000, eval_windows=32, teacher_lr=3e-3,
                  teacher_warmup=5, eval_every=20, impl="scan", dropout=0.0),
    "min": dict(d_model=384, n_layers=6, n_heads=6, seq_len=256, batch_size=64, teacher_steps=2000,
                ft_steps=100, lrs=(3e-4, 1e-3, 3e-3), limit_chars=0, eval_windows=0, teacher_lr=1e-3,
                teacher_warmup=100, eval_every=250, impl="auto", dropout=0.2),
    "full": dict(d_model=384, n_layers=6, n_heads=6, seq_len=256, batch_size=64, teacher_steps=5000,
                 ft_steps=250, lrs=(3e-4, 1e-3, 3e-3), limit_chars=0, eval_windows=0, teacher_lr=1e-3,
                 teacher_warmup=100, eval_every=500, impl="auto", dropout=0.2),
}

NEOX = dict(kind="transformer", norm="layer", norm_eps=1e-5, parallel_residual=True, attn_bias=True,
            mlp_kind="gelu", rope_fraction=0.25, tie_embeddings=False)


def teacher_config(v: dict, vocab_size: int, dtype: str):
  from efficient_lm.configs import ModelConfig, get_config
  return get_config(ModelConfig(**NEOX), vocab_size=vocab_size, d_model=v["d_model"], n_layers=v["n_layers"],
                    n_heads=v["n_heads"], dtype=dtype, param_dtype="float32", dropout=v["dropout"])


def check_variant(ft_steps: int, transfer_steps: int, objective: str):
  """Raises ValueError unless the variant fits the fine-tune budget: the transfer steps count
  inside it and at least one fine-tuning step must remain."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  if isinstance(transfer_steps, bool) or not isinstance(transfer_steps, int) or transfer_steps < 0:
    raise ValueError(f"transfer steps must be an int >= 0, got {transfer_steps!r}")
  if transfer_steps >= ft_steps:
    raise ValueError(f"transfer steps ({transfer_steps}) must be fewer than the fine-tune budget ({ft_steps} "
                     "steps): they count inside it, and at least one fine-tuning step must remain")


def default_transfer_steps(ft_steps: int) -> int:
  """A fifth of the tuning budget: the measured default (20 of 100 steps, module docstring)."""
  return ft_steps // 5


def variant(cfg: dict) -> str:
  """How the converted model was tuned, in the table's words ("fine-tuned": cross-entropy)."""
  transfer, objective = cfg.get("transfer_steps", 0), cfg.get("objective", "ce")
  tuned = "fine-tuned" if objective == "ce" else "KL-distilled from the teacher"
  return (f"{transfer} attention-transfer steps + " if transfer else "") + tuned


class DistillTrainer(lmrun.Trainer):
  """`lmrun.Trainer` whose train step is `make_distill_step` (batches carry the teacher's logits,
  `with_teacher_logits`); evaluation stays cross-entropy on the data, as for every other run."""

  def __init__(self, model, ocfg, steps: int, *, seed: int = 0):
    import jax

    from efficient_lm.interop import make_distill_step
    super().__init__(model, ocfg, steps, seed=seed)
    self._step = jax.jit(make_distill_step(self.graphdef, self.opt, self.schedule, dropout=self.cfg.uses_dropout,
                                           dropout_seed=seed), donate_argnums=(0,))


def best(runs: list[dict]) -> dict | None:
  done = [r for r in runs if r.get("val_loss") is not None]
  return min(done, key=lambda r: r["val_loss"]) if done else None


def summarize(res: dict) -> dict:
  t = res.get("teacher", {}).get("val_loss")
  ft, sc = best(res.get("finetune", [])), best(res.get("scratch", []))
  before = res.get("converted_before", {}).get("val_loss")
  s = {"teacher": t, "converted_before": before,
       "converted_after": ft and ft["val_loss"], "converted_after_lr": ft and ft["lr"],
       "scratch": sc and sc["val_loss"], "scratch_lr": sc and sc["lr"], "target_gap": TARGET_GAP}
  if t is not None and ft is not None:
    s["gap_after"] = ft["val_loss"] - t
    s["target_met"] = bool(s["gap_after"] <= TARGET_GAP)
  if t is not None and before is not None:
    s["gap_before"] = before - t
  if ft is not None and sc is not None:
    s["converted_minus_scratch"] = ft["val_loss"] - sc["val_loss"]
  if res.get("transfer"):
    s["converted_after_transfer"] = res["transfer"]["val_loss"]
  return s


def run(version: str, out: str, seed: int = 0, learn_decay: bool = False, teacher_steps: int | None = None,
        ft_steps: int | None = None, calibrate: bool = True, transfer_steps: int | None = None,
        objective: str = "kl", log=print) -> dict:
  """The experiment; transfer_steps None: a fifth of the tuning budget (`default_transfer_steps`)."""
  from efficient_lm import convert_to_dijiang, create_model
  from efficient_lm.interop import calibrate_dijiang, transfer_attention, with_teacher_logits
  from efficient_lm.training.optim import OptimConfig

  started = time.time()
  learn_decay = learn_decay or calibrate   # calibration sets per-head decays: they must be parameters
  v = dict(VERSIONS[version])
  v.update({k: x for k, x in (("teacher_steps", teacher_steps), ("ft_steps", ft_steps)) if x})
  if transfer_steps is None:
    transfer_steps = default_transfer_steps(v["ft_steps"])
  check_variant(v["ft_steps"], transfer_steps, objective)   # before the teacher's minutes are spent
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, FILE)
  data = lmrun.load_chars(limit_chars=v["limit_chars"])
  dtype = lmrun.compute_dtype()
  bs, t = v["batch_size"], v["seq_len"]
  val = lmrun.eval_windows(data.val, bs, t, v["eval_windows"])
  tcfg = teacher_config(v, data.vocab_size, dtype)
  res = {"version": version, "config": {**{k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()},
                                        "compute_dtype": dtype, "data": data.path,
                                        "train_chars": int(data.train.size), "val_chars": int(data.val.size),
                                        "val_windows": len(val) * v["batch_size"], "seed": seed,
                                        "learn_decay": learn_decay, "calibrate": calibrate,
                                        "init": "calibrated" if calibrate else "default",
                                        "transfer_steps": transfer_steps, "objective": objective,
                                        "transfer_lr": TRANSFER_LR if transfer_steps else None},
         "teacher": {}, "converted_before": {}, "finetune": [], "scratch": []}

  def save(stage):
    res["summary"] = summarize(res)
    res["meta"] = run_meta(seed=seed, started=started, version=version, stage=stage,
                           tokens=sum(r.get("tokens", 0) for r in [res["teacher"], res.get("transfer", {})]
                                      + res["finetune"] + res["scratch"]))
    write_json(path, res)

  # 1. the teacher
  tocfg = OptimConfig(lr=v["teacher_lr"], warmup_steps=v["teacher_warmup"], b2=0.99, weight_decay=0.1)
  trainer = lmrun.Trainer(create_model(tcfg, seed=seed), tocfg, v["teacher_steps"], seed=seed)
  res["config"]["teacher_params"] = trainer.n_params
  log(f"teacher: {trainer.n_params / 1e6:.2f}M parameters, {v['teacher_steps']} steps")
  rec, params = trainer.fit(v["teacher_lr"], lmrun.random_batches(data.train, bs, t, seed), val,
                            eval_every=v["eval_every"], log=log)
  res["teacher"] = lmrun.val_record(rec, lr=v["teacher_lr"], seed=seed, batch_size=bs, seq_len=t)
  log(f"  teacher: val {rec['eval_loss']:.4f}, {rec['wall_s']} s")
  save("teacher")
  teacher = trainer.merge(params)
  del trainer

  # 2. conversion
  converted = convert_to_dijiang(teacher, seed=seed, learn_decay=learn_decay, impl=v["impl"])
  if calibrate:   # one training batch (its own seed), not validation data
    t0 = time.time()
    cal = lmrun.random_batches(data.train, min(bs, 16), t, seed + 7)(0)["inputs"]
    res["calibration"] = calibrate_dijiang(converted, teacher, cal)
    res["config"]["calibration_s"] = round(time.time() - t0, 2)
    log(f"calibrated in {res['config']['calibration_s']} s: decay n per layer "
        f"{[r['decay_n'] for r in res['calibration']]}, gate constant {[r['gate_constant'] for r in res['calibration']]}")
  ft_steps = v["ft_steps"]
  focfg = OptimConfig(lr=1.0, warmup_steps=max(ft_steps // 10, 1), b2=0.99, weight_decay=0.1)
  ftrain = lmrun.Trainer(converted, focfg, ft_steps, seed=seed)
  res["config"]["dijiang_params"] = ftrain.n_params
  res["converted_before"] = {"val_loss": ftrain.evaluate(ftrain.params0, val)["loss"]}
  log(f"converted, before fine-tuning: val {res['converted_before']['val_loss']:.4f}")
  save("converted")

  # 3a. attention transfer: the first steps of the budget, done once for every lr's fine-tune
  if transfer_steps:
    t0 = time.time()
    tbatches = lmrun.random_batches(data.train, bs, t, seed + 200)   # own stream: the fine-tune's stays the default's
    layers = transfer_attention(converted, teacher, lambda s: tbatches(s)["inputs"], transfer_steps, lr=TRANSFER_LR)
    res["transfer"] = {"steps": transfer_steps, "lr": TRANSFER_LR, "seed": seed + 200,
                       "val_loss": ftrain.evaluate(lmrun.Trainer.split(converted)[1], val)["loss"],
                       "layers": layers, "tokens": transfer_steps * bs * t, "wall_s": round(time.time() - t0, 2)}
    log(f"after {transfer_steps} attention-transfer steps: val {res['transfer']['val_loss']:.4f}")
    save("transfer")

  # 3b. fine-tune (the rest of the budget) vs scratch (all of it), same lr grid; interleaved so a
  # cut-off run has both. Cross-entropy without transfer reuses the scratch runs' compiled step.
  tune_steps = ft_steps - transfer_steps
  tune = ftrain
  if (objective, transfer_steps) != ("ce", 0):
    tocfg = OptimConfig(lr=1.0, warmup_steps=max(tune_steps // 10, 1), b2=0.99, weight_decay=0.1)
    tune = (DistillTrainer if objective == "kl" else lmrun.Trainer)(converted, tocfg, tune_steps, seed=seed)
  add_logits = with_teacher_logits(teacher) if objective == "kl" else None

  def tune_batches():   # the default's data order; for kl each batch also carries the teacher's logits
    b = lmrun.random_batches(data.train, bs, t, seed + 100)
    return b if add_logits is None else lambda s: add_logits(b(s))

  for lr in v["lrs"]:
    for kind in ("finetune", "scratch"):
      model = converted if kind == "finetune" else create_model(converted.config, seed=seed + 1)
      trainer, batches = (tune, tune_batches()) if kind == "finetune" else (
          ftrain, lmrun.random_batches(data.train, bs, t, seed + 100))
      log(f"{kind}: lr {lr:g}, {trainer.steps} steps" + (f" ({variant(res['config'])})" if kind == "finetune" else ""))
      try:
        _, params, rest = lmrun.Trainer.split(model)
        rec, _ = trainer.fit(lr, batches, val, params=params, rest=rest, eval_every=max(trainer.steps // 4, 1),
                             log=log)
        rec = lmrun.val_record(rec, lr=lr, seed=seed + 100, batch_size=bs, seq_len=t)
        log(f"  done: val {rec['val_loss']:.4f}")
        if kind == "finetune":   # curves in steps of the budget: the transfer's come first
          for curve in ("val_curve", "train_curve"):
            rec[curve] = [[s + transfer_steps, x] for s, x in rec[curve]]
          rec["val_curve"][:0] = [[0, res["converted_before"]["val_loss"]]] + (
              [[transfer_steps, res["transfer"]["val_loss"]]] if transfer_steps else [])
          rec.update(transfer_steps=transfer_steps, objective=objective)
      except Exception as e:  # keep the other runs
        rec = {"lr": lr, "val_loss": None, "error": f"{type(e).__name__}: {e}"[:500]}
        log(f"  failed: {rec['error']}")
      res[kind].append(rec)
      save(f"{kind} lr {lr:g}")
  save("done")
  return res


# ------------------------------------------------------------------ report


def markdown(results_dir: str) -> str:
  """The README table of this experiment from `results_dir/dijiang.json`."""
  path = os.path.join(results_dir, FILE)
  if not os.path.exists(path):
    return f"(no DiJiang conversion results in {results_dir})\n"
  res = read_json(path)
  meta, cfg, s = res.get("meta", {}), res.get("config", {}), summarize(res)
  f = lambda x: "-" if x is None else f"{x:.4f}"
  gap = lambda x: "-" if x is None or s.get("teacher") is None else f"{x - s['teacher']:+.4f}"
  tsteps, fsteps, transfer = cfg.get("teacher_steps"), cfg.get("ft_steps"), cfg.get("transfer_steps", 0)
  lines = [
      f"DiJiang conversion ({res.get('version')} version; {meta.get('hardware', '?')}, {meta.get('date', '?')}; "
      f"char Tiny Shakespeare, teacher d {cfg.get('d_model')} x {cfg.get('n_layers')} layers, "
      f"{(cfg.get('teacher_params') or 0) / 1e6:.2f}M params, batch {cfg.get('batch_size')} x {cfg.get('seq_len')}, "
      f"{cfg.get('compute_dtype')}; {cfg.get('init', 'default')} init; wall {meta.get('wall_s', '?')} s"
      + ("; RUN INCOMPLETE: last stage " + str(meta.get("stage")) if meta.get("stage") != "done" else "") + ")",
      "",
      "| model | training steps | val loss (nats/char) | vs teacher |",
      "|---|---|---|---|",
      f"| softmax teacher (GPT-NeoX style) | {tsteps} | {f(s.get('teacher'))} | |",
      f"| converted to DiJiang, no fine-tuning | {tsteps} + 0 | {f(s.get('converted_before'))} | "
      f"{gap(s.get('converted_before'))} |",
      *([f"| converted + {transfer} attention-transfer steps, no fine-tuning | {tsteps} + {transfer} | "
         f"{f(s.get('converted_after_transfer'))} | {gap(s.get('converted_after_transfer'))} |"] if transfer else []),
      f"| converted + {variant(cfg)} (best lr {s.get('converted_after_lr') or '-'}) | {tsteps} + "
      + (f"{transfer} + {fsteps - transfer}" if transfer else f"{fsteps}")
      + f" | {f(s.get('converted_after'))} | {gap(s.get('converted_after'))} |",
      f"| DiJiang from scratch (best lr {s.get('scratch_lr') or '-'}) | {fsteps} | {f(s.get('scratch'))} | "
      f"{gap(s.get('scratch'))} |",
      "",
  ]
  if "target_met" in s:
    lines.append(f"Target (converted within {TARGET_GAP} nats of the teacher after {fsteps} steps): "
                 f"{'met' if s['target_met'] else 'missed'} (gap {s['gap_after']:+.4f}). "
                 f"Learning rates tried for both fine-tuning and scratch: {cfg.get('lrs')}.")
    lines.append("")
  if meta.get("note"):   # where the run came from, and what it replaced
    lines += [meta["note"], ""]
  return "\n".join(lines)


def plot(out: str) -> str | None:
  plt = pyplot()
  if plt is None:
    print("matplotlib is not installed: no plot (run --plot-only where it is)")
    return None
  res = read_json(os.path.join(out, FILE))
  s = summarize(res)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for kind, style in (("finetune", "-o"), ("scratch", "-s")):
    for r in res.get(kind, []):
      if r.get("val_curve"):
        x, y = zip(*r["val_curve"])
        label = f"{'converted + ' + variant(res['config']) if kind == 'finetune' else 'DiJiang scratch'}, lr {r['lr']:g}"
        ax.plot(x, y, style, ms=3, label=label, alpha=1.0 if r is best(res[kind]) else 0.35)
  if s.get("teacher") is not None:
    ax.axhline(s["teacher"], color="k", lw=1, label=f"teacher {s['teacher']:.3f}")
    ax.axhline(s["teacher"] + TARGET_GAP, color="k", lw=1, ls="--", label=f"teacher + {TARGET_GAP}")
  ax.set_xlabel("fine-tuning / training step")
  ax.set_ylabel("validation loss (nats/char)")
  meta = res.get("meta", {})
  ax.set_title(f"DiJiang conversion ({res.get('version')}, {meta.get('hardware', '')})", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out, "dijiang.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv=None):
  ap = experiment_parser(__doc__, quick_help="CPU-sized version (seconds)", full_help="the longer teacher (5000 steps, 250 fine-tune)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--learn-decay", action="store_true", help="DiJiang with learned per-head decays")
  ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                  help="calibrate_dijiang's init from one teacher batch (default on; implies --learn-decay)")
  ap.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the version's)")
  ap.add_argument("--ft-steps", type=int, default=None, help="fine-tune / scratch steps (default: the version's)")
  ap.add_argument("--transfer-steps", type=int, default=None,
                  help="attention-transfer steps before tuning, counted inside the --ft-steps budget "
                       "(default: a fifth of it)")
  ap.add_argument("--objective", choices=OBJECTIVES, default="kl",
                  help="tuning loss: kl (KL to the teacher's logits, default) or ce (cross-entropy on the data)")
  args = ap.parse_args(argv)
  version = version_of(args)
  ft_steps = args.ft_steps or VERSIONS[version]["ft_steps"]
  if args.transfer_steps is None:
    args.transfer_steps = default_transfer_steps(ft_steps)
  try:   # a bad variant fails here, before anything is written
    check_variant(ft_steps, args.transfer_steps, args.objective)
  except ValueError as e:
    ap.error(str(e))
  out = args.out or results_dir(NAME)
  os.makedirs(out, exist_ok=True)
  if not args.plot_only:
    run(version, out, seed=args.seed, learn_decay=args.learn_decay, teacher_steps=args.teacher_steps,
        ft_steps=args.ft_steps, calibrate=args.calibrate, transfer_steps=args.transfer_steps,
        objective=args.objective)
  plot(out)
  print(markdown(out))


if __name__ == "__main__":
  main()
