"""Experiment 5: prefill and decode throughput and peak memory vs context length.

    python experiments/inference.py             # minimum credible version (H100): 1k, 8k, 32k
    python experiments/inference.py --full      # 1k, 8k, 32k, 64k
    python experiments/inference.py --quick     # CPU-sized, seconds
    python experiments/inference.py --plot-only [--out DIR]

Models (random weights: throughput and memory do not depend on them), one moderate size:
d 1024, 8 heads of 128, vocabulary 32000, bf16 weights and compute, non-embedding parameters
matched within 12% (51-58M; 88-117M with embeddings, Rodimus ties its head):
- Transformer++ (global attention, KV cache [B, max_len, 8, 128] x 2 per layer), 4 layers, 51.4M;
- Rodimus (constant state [B, 1, 64, 2048] + conv), 8 layers (a Rodimus block has no MLP: about
  half a transformer block's parameters), 55.2M;
- Rodimus+ (Rodimus + SW-SKA with a 2048-token ring cache + FFN), 4 layers, 57.5M;
- DeltaNet (constant state [B, 8, 128, 128] + conv caches), 4 layers, 51.5M.
Batch 1 and 8. For each (model, batch, context T):
- prefill: one jitted forward over T prompt tokens that returns the decode cache and the last
  position's logits (the full [B, T, vocab] logits are never formed); median of 3 after a
  compile; tokens/s = B * T / time;
- decode: `model.decode` inside ONE jitted `lax.scan` of 64 greedy steps (no per-token Python
  dispatch), the cache donated; median of 3 calls after a compile call, each continuing from
  the last (so decoding runs at positions T .. T + 256); ms per step (one token per sequence)
  and tokens/s = B * 64 / time;
- memory: the decode cache's bytes (exact), the compiled temp bytes of the prefill and decode
  programs, and the device's `peak_bytes_in_use` from `device.memory_stats()` (null on CPU).
  Each model runs in its own process, its configurations in increasing B * T, so the process
  peak after a configuration is that configuration's peak (weights included).
The recurrences use the library default (`impl="auto"`: the chunked XLA form); `--impl pallas`
measures the Pallas kernels instead.

Results: `experiments/results/inference/inference.json` (rewritten after every configuration,
so a cut-off run keeps what finished) and `inference.png`.

Time on one H100 (estimate, not measured yet): minimum version 4-6 minutes (24 configurations,
dominated by ~48 compilations of a few seconds each; a `--budget-s` of 450 s stops the last
models early rather than overrun); `--full` 7-9 minutes (raise --budget-s, or run
`--models transformer,rodimus` and `--models rodimus_plus,deltanet` as two invocations: rows of
other models already in --out are kept). `--quick`: ~20 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from experiments.common import (  # noqa: E402
    experiment_parser, pyplot, read_json, results_dir, run_meta, version_of, write_json)

NAME = "inference"
FILE = "inference.json"
MODELS = ("transformer", "rodimus", "rodimus_plus", "deltanet")
LABEL = {"transformer": "Transformer++ (KV cache)", "rodimus": "Rodimus (state)",
         "rodimus_plus": "Rodimus+ (state + window)", "deltanet": "DeltaNet (state)"}

VERSIONS = {
    "quick": dict(d_model=64, n_heads=4, vocab_size=256, layers=1, mem_size=16, window=16, contexts=(32, 64),
                  batches=(2,), decode_steps=4, reps=1, dtype="float32", impl="scan", chunk_size=16),
    "min": dict(d_model=1024, n_heads=8, vocab_size=32000, layers=4, mem_size=64, window=2048,
                contexts=(1024, 8192, 32768), batches=(1, 8), decode_steps=64, reps=3, dtype="bfloat16",
                impl="auto", chunk_size=64),
    "full": dict(d_model=1024, n_heads=8, vocab_size=32000, layers=4, mem_size=64, window=2048,
                 contexts=(1024, 8192, 32768, 65536), batches=(1, 8), decode_steps=64, reps=3, dtype="bfloat16",
                 impl="auto", chunk_size=64),
}


def model_config(name: str, v: dict, impl: str):
  from efficient_lm.configs import get_config
  from efficient_lm.configs.presets import DELTANET, RODIMUS, RODIMUS_PLUS, TRANSFORMER
  base = {"transformer": TRANSFORMER, "rodimus": RODIMUS, "rodimus_plus": RODIMUS_PLUS, "deltanet": DELTANET}[name]
  kw = dict(vocab_size=v["vocab_size"], d_model=v["d_model"], n_heads=v["n_heads"],
            n_layers=2 * v["layers"] if name == "rodimus" else v["layers"], dtype=v["dtype"],
            param_dtype=v["dtype"], impl=impl, chunk_size=v["chunk_size"])
  if name in ("rodimus", "rodimus_plus"):
    kw["mem_size"] = v["mem_size"]
  if name == "rodimus_plus":
    kw["window"] = v["window"]
  return get_config(base, **kw)


# ------------------------------------------------------------------ measuring one model (worker)


def prefill_last(model, tokens_BT, max_len: int):
  """`model.prefill` without the [B, T, vocab] logits: -> (logits of the last position [B, V],
  the decode cache at position T). The blocks' own prefill, as `LM.prefill` runs them."""
  import jax.numpy as jnp
  from efficient_lm.layers.rope import positions
  b, t = tokens_BT.shape
  x = model.embed(tokens_BT).astype(model.config.stream_dtype)
  pos_BT = positions(None, b, t)
  layers = []
  for block in model.blocks:
    x, cache, _ = block.prefill(x, pos_BT, max_len, None, None)
    layers.append(cache)
  w, layout = model.head_weight()
  h = model.norm_f(x[:, -1]).astype(w.dtype)
  logits = jnp.einsum("bd,vd->bv" if layout == "vd" else "bd,dv->bv", h, w, preferred_element_type=jnp.float32)
  return logits, {"pos": jnp.asarray(t, jnp.int32), "layers": layers}


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _mem_mb(compiled):
  try:
    m = compiled.memory_analysis()
    return {"temp_mb": m.temp_size_in_bytes / 2**20, "argument_mb": m.argument_size_in_bytes / 2**20,
            "output_mb": m.output_size_in_bytes / 2**20, "alias_mb": m.alias_size_in_bytes / 2**20}
  except Exception:  # best effort on some backends
    return None


def _device_mem(dev):
  try:
    s = dev.memory_stats()
  except Exception:
    s = None
  if not s:
    return None, None
  return s.get("peak_bytes_in_use", 0) / 2**20, s.get("bytes_in_use", 0) / 2**20


def measure_model(name: str, v: dict, impl: str, emit, log=print, compile_threads: int = 0):
  """Runs every (batch, context) configuration of one model; `emit(row)` after each.
  compile_threads: programs compiled at once (0: one on accelerators, whose compiler autotunes
  kernels by timing them on the device, so concurrent compiles could pick worse kernels; up to
  8 on CPU)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from efficient_lm import create_model
  from efficient_lm.models.cache import tree_bytes

  cfg = model_config(name, v, impl)
  model = create_model(cfg, seed=0)
  graphdef, state = nnx.split(model)
  del model
  dev = jax.devices()[0]
  n_params = int(sum(x.size for x in jax.tree.leaves(state)))
  n_embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  n_steps, reps = v["decode_steps"], v["reps"]
  base_peak, base_in_use = _device_mem(dev)
  configs = sorted(((b, t) for b in v["batches"] for t in v["contexts"]), key=lambda bt: (bt[0] * bt[1], bt[0]))

  def prefill_fn(state, tokens, max_len):
    logits, cache = prefill_last(nnx.merge(graphdef, state), tokens, max_len)
    return jnp.argmax(logits, -1).astype(jnp.int32), cache

  def decode_fn(state, cache, token):
    model = nnx.merge(graphdef, state)

    def body(carry, _):
      tok, cache = carry
      logits, cache = model.decode(tok[:, None], cache)
      return (jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache), None

    (tok, cache), _ = jax.lax.scan(body, (token, cache), None, length=n_steps)
    return tok, cache

  # Trace every program first (main thread), then compile them (in parallel threads on CPU: XLA
  # compilation releases the GIL). One decode program per distinct cache shape (a recurrent
  # state does not grow with T).
  plans, lowered, errors = {}, {}, {}
  for b, t in configs:
    max_len = t + (reps + 1) * n_steps
    try:
      spec = jax.ShapeDtypeStruct((b, t), jnp.int32)
      lowered[("prefill", b, t)] = jax.jit(prefill_fn, static_argnums=(2,)).lower(state, spec, max_len)
      tok_spec, cache_spec = jax.eval_shape(lambda s, x: prefill_fn(s, x, max_len), state, spec)
      key = ("decode", str(jax.tree.map(lambda x: (x.shape, str(x.dtype)), cache_spec)))
      if key not in lowered:
        lowered[key] = jax.jit(decode_fn, donate_argnums=(1,)).lower(state, cache_spec, tok_spec)
      plans[(b, t)] = key
    except Exception as e:
      errors[(b, t)] = f"{type(e).__name__}: {e}"[:400]

  def compile_one(item):
    k, low = item
    t0 = time.perf_counter()
    try:
      return k, low.compile(), time.perf_counter() - t0
    except Exception as e:
      return k, e, time.perf_counter() - t0

  # On CPU, compile everything at once in threads. On an accelerator, one program at a time,
  # just before the configuration that first needs it: XLA autotunes kernels on the device at
  # compile time, which (a) would pick worse kernels next to concurrent compiles and (b) uses
  # device scratch memory, which then lands in the peak of that configuration, not an earlier one.
  threads = compile_threads or (max(1, min(8, os.cpu_count() or 1)) if jax.default_backend() == "cpu" else 1)
  compiled = {}
  if threads > 1:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as ex:
      compiled = {k: (c, s) for k, c, s in ex.map(compile_one, lowered.items())}
    for k, (c, _) in list(compiled.items()):   # a compile that failed next to others: one more try alone
      if isinstance(c, Exception):
        compiled[k] = compile_one((k, lowered[k]))[1:]
    log(f"{name}: {len(compiled)} programs compiled in {time.perf_counter() - t0:.1f} s ({threads} threads)")

  def program(k):
    if k not in compiled:
      compiled[k] = compile_one((k, lowered[k]))[1:]
    return compiled[k]

  for b, t in configs:
    row = {"model": name, "batch": b, "context": t, "n_layers": cfg.n_layers, "params": n_params,
           "non_embedding_params": n_params - n_embed,
           "impl": impl, "decode_steps": n_steps, "reps": reps, "weights_mb": base_in_use}
    try:
      if (b, t) in errors:
        raise RuntimeError(errors[(b, t)])
      pre, row["prefill_compile_s"] = program(("prefill", b, t))
      dec, row["decode_compile_s"] = program(plans[(b, t)])
      for prog in (pre, dec):
        if isinstance(prog, Exception):
          raise prog
      row["prefill_mem"], row["decode_mem"] = _mem_mb(pre), _mem_mb(dec)
      tokens = jnp.asarray(np.random.default_rng(t + b).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
      times = []
      for i in range(reps + 1):
        t0 = time.perf_counter()
        tok, cache = jax.block_until_ready(pre(state, tokens))
        times.append(time.perf_counter() - t0)
        if i < reps:
          del tok, cache
      row["prefill_s"] = _median(times[1:])
      row["prefill_tok_s"] = b * t / row["prefill_s"]
      row["cache_mb"] = tree_bytes(cache) / 2**20
      times = []
      for _ in range(reps + 1):
        t0 = time.perf_counter()
        tok, cache = jax.block_until_ready(dec(state, cache, tok))
        times.append(time.perf_counter() - t0)
      step_s = _median(times[1:]) / n_steps
      row["decode_ms_per_step"] = 1e3 * step_s
      row["decode_tok_s"] = b / step_s
      row["decode_positions"] = [t + n_steps, t + (reps + 1) * n_steps]
      del cache, tok, tokens
    except Exception as e:  # OOM or a refused kernel: record, go on with the next configuration
      row["error"] = f"{type(e).__name__}: {e}"[:400]
    row["peak_mb"], row["in_use_mb"] = _device_mem(dev)
    log(f"{name} B={b} T={t}: " + ", ".join(
        f"{k} {row[k]:.4g}" for k in ("prefill_s", "prefill_tok_s", "decode_ms_per_step", "decode_tok_s",
                                      "cache_mb", "peak_mb") if isinstance(row.get(k), (int, float)))
        + (f" ERROR {row['error']}" if "error" in row else ""))
    emit(row)


def worker(name: str, version: str, impl: str, compile_threads: int = 0):
  """One model in this process: prints `META {...}` then `ROW {...}` lines for the parent."""
  v = VERSIONS[version]
  print("META " + json.dumps(run_meta(version=version)), flush=True)
  measure_model(name, v, impl, lambda row: print("ROW " + json.dumps(row), flush=True),
                log=lambda s: print(s, file=sys.stderr, flush=True), compile_threads=compile_threads)


# ------------------------------------------------------------------ the run (parent)


def run(version: str, out: str, *, impl: str | None = None, models=MODELS, isolate: bool = True,
        budget_s: float = 450.0, fresh: bool = False, compile_threads: int = 0, log=print) -> dict:
  """Measures `models`; with `isolate`, each model in a child process (the parent never touches
  the accelerator). Rows of other models already in `out` (same version) are kept unless `fresh`."""
  started = time.time()
  v = VERSIONS[version]
  impl = impl or v["impl"]
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, FILE)
  res = {"version": version, "config": {**{k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()},
                                        "impl": impl, "models": list(models)}, "rows": [], "meta": {}}
  if not fresh and os.path.exists(path):
    try:
      old = read_json(path)
    except ValueError:
      old = {}
    if old.get("version") == version:
      res["rows"] = [r for r in old.get("rows", []) if r["model"] not in models]
      res["config"]["models"] = sorted({*models, *(r["model"] for r in res["rows"])}, key=MODELS.index)
      res["meta"] = old.get("meta", {})

  def save(stage, meta=None):
    if meta:
      res["meta"] = dict(meta)
    res["meta"].update(stage=stage, wall_s=round(time.time() - started, 1), budget_s=budget_s,
                       isolated=isolate, command=" ".join(["python"] + sys.argv))
    write_json(path, res)

  def emit(row):
    res["rows"].append(row)
    save(f"{row['model']} B={row['batch']} T={row['context']}")

  if not isolate:
    save("start", run_meta(version=version))
    for name in models:
      measure_model(name, v, impl, emit, log=log, compile_threads=compile_threads)
  else:
    for i, name in enumerate(models):
      left = budget_s - (time.time() - started)
      timeout = max(left - 45 * (len(models) - i - 1), 30)
      cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--version", version, "--impl", impl,
             "--compile-threads", str(compile_threads)]
      log(f"[{name}] child process, timeout {timeout:.0f} s")
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=ROOT)
      watchdog = threading.Timer(timeout, proc.kill)
      watchdog.start()
      try:
        for line in proc.stdout:
          if line.startswith("META "):
            save("start", json.loads(line[5:]))
          elif line.startswith("ROW "):
            emit(json.loads(line[4:]))
        proc.wait()
      finally:
        stopped = not watchdog.is_alive() and proc.returncode != 0
        watchdog.cancel()
      if stopped:
        res["rows"].append({"model": name, "error": f"stopped by the time budget after {timeout:.0f} s"})
        log(f"[{name}] stopped by the time budget")
      elif proc.returncode != 0:
        res["rows"].append({"model": name, "error": f"worker exited with {proc.returncode}"})
      save(f"{name} done")
  save("done")
  return res


# ------------------------------------------------------------------ report


def _rows(res):
  return [r for r in res.get("rows", []) if "batch" in r]


def markdown(results_dir: str) -> str:
  """The README table of this experiment from `results_dir/inference.json`."""
  path = os.path.join(results_dir, FILE)
  if not os.path.exists(path):
    return f"(no inference results in {results_dir})\n"
  res = read_json(path)
  meta, cfg = res.get("meta", {}), res.get("config", {})
  f = lambda x, fmt: "-" if not isinstance(x, (int, float)) else format(x, fmt)
  lines = [
      f"Inference ({res.get('version')} version; {meta.get('hardware', '?')}, {meta.get('date', '?')}; "
      f"d {cfg.get('d_model')}, {cfg.get('n_heads')} heads, vocab {cfg.get('vocab_size')}, {cfg.get('dtype')} "
      f"weights and compute, recurrences impl={cfg.get('impl')}; decode: {cfg.get('decode_steps')} greedy steps in "
      f"one jitted scan; median of {cfg.get('reps')}; wall {meta.get('wall_s', '?')} s"
      + ("; RUN INCOMPLETE: last stage " + str(meta.get("stage")) if meta.get("stage") != "done" else "") + ")",
      "",
      "| model | layers | params (non-embedding) | batch | context | prefill s | prefill tok/s | decode ms/step "
      "| decode tok/s | cache MiB | peak MiB |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  order = {m: i for i, m in enumerate(MODELS)}
  for r in sorted(_rows(res), key=lambda r: (order.get(r["model"], 9), r["batch"], r["context"])):
    err = f" ({r['error'][:60]})" if r.get("error") else ""
    lines.append(f"| {LABEL.get(r['model'], r['model'])}{err} | {r.get('n_layers', '-')} | "
                 f"{f(r.get('params', 0) / 1e6, '.1f')}M ({f(r.get('non_embedding_params', 0) / 1e6, '.1f')}M) | {r['batch']} | {r['context']} | "
                 f"{f(r.get('prefill_s'), '.4f')} | {f(r.get('prefill_tok_s'), ',.0f')} | "
                 f"{f(r.get('decode_ms_per_step'), '.3f')} | {f(r.get('decode_tok_s'), ',.0f')} | "
                 f"{f(r.get('cache_mb'), ',.1f')} | {f(r.get('peak_mb'), ',.0f')} |")
  for r in res.get("rows", []):
    if "batch" not in r:
      lines.append(f"\n{LABEL.get(r['model'], r['model'])}: {r.get('error')}")
  lines.append("")
  return "\n".join(lines)


def plot(out: str) -> str | None:
  plt = pyplot()
  if plt is None:
    print("matplotlib is not installed: no plot (run --plot-only where it is)")
    return None
  res = read_json(os.path.join(out, FILE))
  rows = [r for r in _rows(res) if "error" not in r]
  fig, axes = plt.subplots(1, 4, figsize=(17, 4))
  keys = (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s"),
          ("cache_mb", "decode cache MiB"), ("peak_mb", "peak device MiB"))
  colors = dict(zip(MODELS, ("k", "tab:blue", "tab:green", "tab:red")))
  for ax, (key, ylabel) in zip(axes, keys):
    for name in MODELS:
      for b, style in zip(sorted({r["batch"] for r in rows}), ("-o", "--s", ":^")):
        pts = sorted((r["context"], r[key]) for r in rows if r["model"] == name and r["batch"] == b
                     and isinstance(r.get(key), (int, float)))
        if pts:
          x, y = zip(*pts)
          ax.plot(x, y, style, color=colors[name], ms=4, label=f"{LABEL[name]}, B={b}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if key == "peak_mb" and not any(isinstance(r.get(key), (int, float)) for r in rows):
      ax.text(0.5, 0.5, "no device memory statistics\n(CPU)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("context length")
    ax.set_ylabel(ylabel)
  axes[0].legend(fontsize=6)
  meta = res.get("meta", {})
  fig.suptitle(f"Inference ({res.get('version')}, {meta.get('hardware', '')}, {res['config'].get('dtype')})",
               fontsize=10)
  fig.tight_layout()
  path = os.path.join(out, "inference.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def main(argv=None):
  ap = experiment_parser(__doc__, quick_help="CPU-sized version (seconds), in one process", full_help="contexts to 64k")
  ap.add_argument("--impl", default=None, help="recurrence form: auto (chunk), chunk, pallas, scan")
  ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
  ap.add_argument("--budget-s", type=float, default=450.0, help="total wall budget; later models are cut short")
  ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                  help="one process per model (auto: yes except --quick)")
  ap.add_argument("--fresh", action="store_true", help="drop rows of other models already in --out")
  ap.add_argument("--compile-threads", type=int, default=0,
                  help="programs compiled at once (0: 1 on GPU, where XLA autotunes on the device; all cores on CPU)")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--version", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    worker(args.worker, args.version, args.impl, args.compile_threads)
    return
  out = args.out or results_dir(NAME)
  os.makedirs(out, exist_ok=True)
  if not args.plot_only:
    version = version_of(args)
    isolate = {"yes": True, "no": False}.get(args.isolate, not args.quick)
    models = tuple(m for m in args.models.split(",") if m)
    bad = sorted(set(models) - set(MODELS))
    if bad:
      ap.error(f"--models: unknown {bad}; choose from {MODELS}")
    run(version, out, impl=args.impl, models=models, isolate=isolate, budget_s=args.budget_s, fresh=args.fresh,
        compile_threads=args.compile_threads)
  plot(out)
  print(markdown(out))


if __name__ == "__main__":
  main()
