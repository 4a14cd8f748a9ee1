"""Experiment 3: subword LM on WikiText-2 (GPT-NeoX tokenizer), matched models.

    python experiments/wikitext2.py              # minimum credible version (one H100)
    python experiments/wikitext2.py --full       # every model family
    python experiments/wikitext2.py --quick      # CPU pipeline check (5-15 s a model on 2 cores)
    python experiments/wikitext2.py --plot-only [--out DIR]
    options: --out DIR, --workers N, --steps S, --models a,b, --time-limit SEC, --fresh

Data (experiments.md 3; the train split is not available offline): train on
`../shared/data/wikitext2.valid.txt` (258k GPT-NeoX tokens), evaluate on `wikitext2.test.txt`
(295k tokens). Both are read as WikiText articles (`efficient_lm.data.sources.read_wikitext`),
tokenised with `../shared/data/gpt-neox-20b.tokenizer.json` (vocabulary 50277, padded to 50304
in the model), each article followed by `<|endoftext|>`, and concatenated. Training batches are
uniformly random 256-token windows; test perplexity is exp(mean cross-entropy per token) over
every non-overlapping 256-token window of the test stream (no overlap: the first tokens of each
window see little context, a slightly pessimistic protocol).

Models (tied embeddings for all; matched on the parameters of the blocks, 3.41M, since the
50304 x d embedding would hide any difference there; totals are in the table):
- minimum credible (default): Transformer++, DeltaNet (d 256, 4 layers, 4 heads: 16.3M in
  all), Rodimus (no MLP: 7 layers at d 240, 15.5M in all); 1200 steps of 16 x 256 tokens (4.9M tokens, ~19
  passes over the 258k training tokens: small data, so dropout 0.2), AdamW lr 1e-3 (b2 0.99,
  wd 0.1, clip 1), warmup 100, cosine to 0.1x. Test perplexity every 100 steps.
- `--full`: + linear attention, GLA, Rodimus+, DiJiang at the same count.
- `--quick`: d 32, 2 layers, 12 steps of 4 x 64 on the first 30k / 15k characters, scan.
The table reports the final test perplexity (the fixed budget; the headline) and the lowest
seen during training (selected on the test set itself, so optimistic; shown for the curve).

Concurrency: the models train as concurrent worker processes (experiments/lmrun.py).

Time (measured, one H200, session 9): the minimum version took 123 s wall (run 20) and 185 s
(run 21), each beside MQAR training on the same GPU; Transformer++ 0.012 s a step, DeltaNet
0.013, Rodimus 0.029 (run 20). `--full` (7 models) is not yet measured.
Results: `experiments/results/wikitext2/wikitext2.json` ({"meta", "rows"}, one row per model
with its curves, written as each model finishes) and `wikitext2.png`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from experiments import lmrun  # noqa: E402
from experiments.common import experiment_parser, read_json, results_and_pyplot, version_of  # noqa: E402
from experiments.shakespeare import ALL_MODELS, LABELS, MIN_MODELS, model_specs  # noqa: E402

NAME = "wikitext2"
FILE = "wikitext2.json"
VOCAB = 50304  # the tokenizer's 50277, padded to a multiple of 64

_OPT = dict(lr=1e-3, warmup=100, min_lr_ratio=0.1, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=1.0)
VERSIONS = {
    "quick": dict(models=MIN_MODELS, d_model=32, n_layers=2, n_heads=2, seq_len=64, batch=4,
                  eval_batch=4, steps=12, eval_every=6, log_every=3, eval_windows=8,
                  limit_chars=30000, dropout=0.2, impl="scan", workers=0, match_tol=0.1,
                  **{**_OPT, "lr": 3e-3, "warmup": 5}),
    "min": dict(models=MIN_MODELS, d_model=256, n_layers=4, n_heads=4, seq_len=256, batch=16,
                eval_batch=64, steps=1200, eval_every=100, log_every=50, eval_windows=0,
                limit_chars=0, dropout=0.2, impl="auto", workers=3, match_tol=0.01, **_OPT),
    "full": dict(models=ALL_MODELS, d_model=256, n_layers=4, n_heads=4, seq_len=256, batch=16,
                 eval_batch=64, steps=1200, eval_every=100, log_every=50, eval_windows=0,
                 limit_chars=0, dropout=0.2, impl="auto", workers=4, match_tol=0.01, **_OPT),
}
VERSION_NAMES = {"quick": "quick (CPU pipeline check)", "min": "minimum credible", "full": "full"}


@dataclasses.dataclass
class TokenData:
  train: np.ndarray
  test: np.ndarray
  vocab_size: int       # the tokenizer's
  tokenizer: str


def load_tokens(limit_chars: int = 0) -> TokenData:
  from efficient_lm.data.sources import read_wikitext  # noqa: PLC0415
  from efficient_lm.data.tokenizers import HFTokenizer  # noqa: PLC0415
  data = lmrun.shared_data_dir()
  tok = HFTokenizer(os.path.join(data, "gpt-neox-20b.tokenizer.json"))

  def stream(name, limit):
    docs = read_wikitext(os.path.join(data, f"wikitext2.{name}.txt"))
    if limit:
      kept, n = [], 0
      for d in docs:
        kept.append(d[:limit - n])
        n += len(kept[-1])
        if n >= limit:
          break
      docs = kept
    pieces = []
    for ids in tok.encode_batch(docs):
      pieces.append(ids)
      if tok.eos_id is not None:
        pieces.append(np.asarray([tok.eos_id], np.int32))
    return np.concatenate(pieces).astype(np.int32)

  return TokenData(train=stream("valid", limit_chars), test=stream("test", limit_chars // 2),
                   vocab_size=tok.vocab_size, tokenizer=os.path.basename(tok.path))


def optim_config(v: dict):
  from efficient_lm.training.optim import OptimConfig  # noqa: PLC0415
  return OptimConfig(lr=1.0, warmup_steps=v["warmup"], min_lr_ratio=v["min_lr_ratio"], b1=v["b1"],
                     b2=v["b2"], weight_decay=v["weight_decay"], clip_norm=v["clip_norm"])


def work(task: dict, emit) -> None:
  import jax  # noqa: PLC0415

  from efficient_lm.configs import get_config  # noqa: PLC0415
  v = task["v"]
  emit({"kind": "device", **lmrun.device_meta()})
  data = load_tokens(v["limit_chars"])
  cfg = get_config(task["preset"], **task["overrides"], impl=v["impl"], dropout=v["dropout"],
                   dtype=lmrun.compute_dtype(), param_dtype="float32")
  trainer = lmrun.Trainer(cfg, optim_config(v), v["steps"], seed=task["seed"])
  evals = lmrun.eval_windows(data.test, v["eval_batch"], v["seq_len"], v["eval_windows"])
  nb = lmrun.random_batches(data.train, v["batch"], v["seq_len"], seed=task["seed"])
  t0 = time.time()
  rec, _ = trainer.fit(v["lr"], nb, evals, eval_every=v["eval_every"], log_every=v["log_every"],
                    deadline=task.get("deadline"), log=lambda m: print(m, flush=True))
  curve = lmrun.curve_summary(rec)
  ppl = lambda loss: math.exp(min(loss, 700.0))
  row = {"model": task["model"], "label": LABELS.get(task["model"], task["model"]),
         "params": trainer.n_params,
         "non_embedding_params": trainer.n_params - cfg.vocab_size * cfg.d_model,  # tied: counted once
         "test_loss": float(rec["eval_loss"]),
         "test_ppl": ppl(rec["eval_loss"]), "best_test_ppl": ppl(min(l for _, l in curve["eval"])),
         "steps": int(rec["steps"]), "tokens": int(rec["steps"]) * v["batch"] * v["seq_len"],
         "wall_s": round(time.time() - t0, 2), "compile_s": rec["compile_s"], "step_s": rec["step_s"],
         "lr": v["lr"], "dropout": v["dropout"], "nonfinite_steps": rec["nonfinite_steps"],
         "config": task["overrides"], "curve": curve}
  print(f"  {task['model']}: test ppl {row['test_ppl']:.2f} ({row['params'] / 1e6:.2f}M params, "
        f"{row['steps']} steps, {row['wall_s']} s)", flush=True)
  emit({"kind": "row", "row": row})
  jax.clear_caches()


def parse(argv):
  p = experiment_parser(__doc__, quick_help="CPU-sized pipeline check", full_help="every model family")
  lmrun.add_pool_args(p)
  return p.parse_args(argv)


def main(argv=None):
  args = parse(argv)
  out = lmrun.pool_script_start(args, NAME, work, plot)
  if out is None:
    return None
  version = version_of(args)
  v = dict(VERSIONS[version])
  if args.steps:
    v["steps"] = args.steps
  if args.workers is not None:
    v["workers"] = args.workers
  v["models"] = tuple(args.models.split(",") if args.models else v["models"])
  if v["workers"] > 0:
    lmrun.parent_on_cpu()
  data = load_tokens(v["limit_chars"])
  res = lmrun.Results(os.path.join(out, FILE), version, fresh=args.fresh, seed=args.seed,
                      version_name=VERSION_NAMES[version], settings=v,
                      data={"train": "wikitext2.valid.txt", "test": "wikitext2.test.txt",
                            "tokenizer": data.tokenizer, "tokenizer_vocab": data.vocab_size,
                            "model_vocab": VOCAB, "train_tokens": int(data.train.size),
                            "test_tokens": int(data.test.size)},
                      steps=v["steps"], tokens_per_run=v["steps"] * v["batch"] * v["seq_len"])
  specs = model_specs(v, VOCAB, v["models"], tie_embeddings=True)
  res.meta["params"] = {s["model"]: s["params"] for s in specs}
  done = res.done(v["steps"])   # a run cut short by a time limit is trained again
  tasks = [dict(s, id=s["model"], seed=args.seed, v=v) for s in specs if s["model"] not in done]
  print(f"WikiText-2 {VERSION_NAMES[version]}: train {data.train.size} tokens, test {data.test.size}; "
        + ", ".join(f"{s['model']} {s['params'] / 1e6:.2f}M" for s in specs)
        + f"; {len(tasks)} to train, {v['workers']} worker(s) -> {res.path}", flush=True)
  res.save()
  complete = lmrun.run_pool(tasks, script=os.path.abspath(__file__), out=out, workers=v["workers"],
                            work=work, on_record=res.on_record, on_failure=res.on_failure,
                            time_limit=args.time_limit, run_dir=args.runs_dir)
  res.meta["complete"] = bool(complete) and not res.meta["failed"]
  res.save()
  print(markdown(out))
  plot(out)
  return {"meta": res.meta, "rows": res.rows}


# ------------------------------------------------------------------ report


def markdown(results_dir: str) -> str:
  path = os.path.join(results_dir, FILE)
  if not os.path.exists(path):
    return f"(no WikiText-2 results in {results_dir})\n"
  res = read_json(path)
  meta, rows = res.get("meta", {}), res.get("rows", [])
  s, d = meta.get("settings", {}), meta.get("data", {})
  order = {m: i for i, m in enumerate(ALL_MODELS)}
  rows = sorted(rows, key=lambda r: order.get(r["model"], 99))
  lines = [
      f"WikiText-2, GPT-NeoX tokenizer ({meta.get('version_name', meta.get('version', '?'))} version; "
      f"{meta.get('hardware', '?')}, {meta.get('date', '?')}; trained on the valid split "
      f"({d.get('train_tokens')} tokens), perplexity on the test split ({d.get('test_tokens')} tokens, "
      f"non-overlapping {s.get('seq_len')}-token windows); batch {s.get('batch')} x {s.get('seq_len')}, "
      f"lr {s.get('lr')}, dropout {s.get('dropout')}, tied embeddings, seed {meta.get('seed')}; "
      f"wall {meta.get('wall_s', '?')} s" + ("" if meta.get("complete", False) else "; INCOMPLETE") + ")",
      "",
      "| model | params (non-embedding) | test ppl (final) | lowest test ppl seen | steps | tokens | wall (s) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    ne = r.get("non_embedding_params")
    ne = "" if ne is None else f" ({ne / 1e6:.2f}M)"
    lines.append(f"| {r.get('label', r['model'])} | {r['params'] / 1e6:.2f}M{ne} | {r['test_ppl']:.2f} | "
                 f"{r['best_test_ppl']:.2f} | {r['steps']} | {r['tokens'] / 1e6:.2f}M | {r['wall_s']:.0f} |")
  lines.append("")
  if meta.get("failed"):
    lines.append(f"Failed or skipped runs: {len(meta['failed'])} (see meta.failed).")
    lines.append("")
  return "\n".join(lines)


def plot(out: str) -> str | None:
  loaded = results_and_pyplot(out, FILE)
  if loaded is None:
    return None
  res, plt = loaded
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, r in enumerate(res.get("rows", [])):
    if r["curve"]["eval"]:
      x, y = zip(*r["curve"]["eval"])
      ax.plot(x, [math.exp(min(l, 700.0)) for l in y], "-o", ms=3, color=f"C{i}",
              label=f"{r.get('label', r['model'])} ({r['params'] / 1e6:.2f}M)")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("test perplexity")
  meta = res.get("meta", {})
  ax.set_title(f"WikiText-2 (GPT-NeoX tokens), {meta.get('version_name', '')} ({meta.get('hardware', '')})",
               fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  png = os.path.join(out, "wikitext2.png")
  fig.savefig(png, dpi=120)
  plt.close(fig)
  print(f"wrote {png}")
  return png


if __name__ == "__main__":
  main()
