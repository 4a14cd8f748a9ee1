"""`elm`: train, evaluate, sample, benchmark, list presets.

  elm train [--config NAME|FILE] [--workdir DIR] [--set key=value ...] [key=value ...]
            [--coordinator-address HOST:PORT --num-processes N --process-id I]
  elm eval --workdir DIR [--step N]
  elm generate --workdir DIR --prompt TEXT [--max-new-tokens N] [--temperature T]
  elm bench [--config NAME] [--set key=value ...] [--steps N]
  elm presets

Bare `elm train` runs the built-in default (a tiny DeltaNet on synthetic MQAR) to completion and
prints the final recall accuracy. Rerunning a train command on the same workdir resumes it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

EXIT_CONFIG, EXIT_NONFINITE = 2, 3


def _overrides(args) -> list[str]:
  return list(args.set or []) + list(getattr(args, "overrides", []) or [])


def _load_cfg(args):
  from efficient_lm.training.config import DEFAULT_RUN, apply_overrides, get_run
  return apply_overrides(get_run(args.config or DEFAULT_RUN), _overrides(args))


def _distributed_config(args):
  """Flags override the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, ...)."""
  import dataclasses

  from efficient_lm import sharding
  env = sharding.distributed_from_env()
  over = {k: v for k, v in (
      ("coordinator_address", args.coordinator_address), ("num_processes", args.num_processes),
      ("process_id", args.process_id),
      ("local_device_ids", tuple(int(x) for x in args.local_device_ids.split(","))
       if args.local_device_ids else None)) if v is not None}
  return dataclasses.replace(env, **over)


def cmd_train(args) -> int:
  from efficient_lm import sharding
  from efficient_lm.training.config import DEFAULT_RUN
  from efficient_lm.training.loop import NonFiniteLossError, train

  cfg = _load_cfg(args)
  sharding.maybe_initialize_distributed(_distributed_config(args), force=args.distributed)
  name = os.path.splitext(os.path.basename(args.config or DEFAULT_RUN))[0]
  workdir = args.workdir or os.path.join("runs", name)
  try:
    summary = train(cfg, workdir)
  except NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_NONFINITE
  import jax
  if jax.process_index() == 0:
    keys = [k for k in ("eval_loss", "eval_accuracy", "eval_perplexity", "eval_bits_per_byte",
                        "eval_bits_per_char", "eval_bits_per_token") if k in summary]
    final = ", ".join(f"{k} {summary[k]:.4f}" for k in keys)
    print(f"step {summary['step']}/{cfg.train.steps}: loss {summary.get('loss', float('nan')):.4f}"
          + (f", {final}" if final else "") + f"  (workdir {summary['workdir']})")
    if cfg.data.source == "mqar" and "eval_accuracy" in summary:
      print(f"final MQAR accuracy: {summary['eval_accuracy']:.4f}")
  if "interrupted" in summary:
    import signal
    return 128 + int(getattr(signal, summary["interrupted"]))
  return 0


def cmd_eval(args) -> int:
  from efficient_lm.data.pipeline import Data
  from efficient_lm.training.loop import evaluate, load_data, load_run, unit_name

  cfg, setup, params, rest, _, step = load_run(args.workdir, args.step)
  data = load_data(cfg, os.path.abspath(args.workdir))
  batches = data.eval_batches(cfg.train.batch_size, args.batches)
  out = {"step": step, **evaluate(setup, params, rest, batches, unit_name(data.tokenizer))}
  print(json.dumps(out))
  return 0


def cmd_generate(args) -> int:
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import efficient_lm
  from efficient_lm.training.loop import load_run

  cfg, setup, params, rest, tokenizer, step = load_run(args.workdir, args.step)
  if tokenizer is None:
    print("error: this run has no tokenizer (synthetic data); nothing to decode", file=sys.stderr)
    return EXIT_CONFIG
  model = nnx.merge(setup.graphdef, params, rest) if rest else nnx.merge(setup.graphdef, params)
  prompt = tokenizer.encode(args.prompt)
  if prompt.size == 0:
    print("error: --prompt is empty", file=sys.stderr)
    return EXIT_CONFIG
  out = efficient_lm.generate(model, jnp.asarray(prompt)[None], args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
  print(tokenizer.decode(np.asarray(out[0]).tolist()))
  return 0


def cmd_bench(args) -> int:
  """Optimizer-step throughput on random tokens: tokens/s, step time, MFU (6 N per token)."""
  import jax
  import numpy as np

  from efficient_lm import sharding as shd
  from efficient_lm.training.loop import build, resolve_model_config

  cfg = _load_cfg(args)
  mesh = shd.make_mesh(cfg.mesh)
  vocab = cfg.model_overrides.get("vocab_size") or cfg.model_config().vocab_size
  model_cfg = resolve_model_config(cfg, vocab)
  setup = build(cfg, model_cfg, mesh)
  state, rest = setup.init()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  B, T = cfg.train.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, model_cfg.vocab_size, (B, T), dtype=np.int32),
           "targets": rng.integers(0, model_cfg.vocab_size, (B, T), dtype=np.int32),
           "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}
  batch = shd.global_batch(batch, setup.batch_sharding)
  t0 = time.time()
  for _ in range(max(args.warmup, 1)):
    state, m = setup.train_step(state, batch, rest)
  jax.block_until_ready(m)
  compile_s = time.time() - t0
  t0 = time.time()
  for _ in range(args.steps):
    state, m = setup.train_step(state, batch, rest)
  jax.block_until_ready(m)
  dt = (time.time() - t0) / args.steps
  tok_s = B * T / dt
  out = {"model": cfg.model, "params": n_params, "batch": B, "seq_len": T,
         "devices": len(jax.devices()), "platform": jax.devices()[0].platform,
         "device_kind": jax.devices()[0].device_kind, "compute_dtype": model_cfg.dtype,
         "step_ms": dt * 1e3, "tokens_per_sec": tok_s, "warmup_s": compile_s}
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  if all(p is not None for p in peaks):
    out["peak_bytes_per_device"] = max(peaks)
  out["mesh"] = dict(zip(mesh.axis_names, mesh.devices.shape))
  peak = args.peak_tflops
  if peak is None and any(h in jax.devices()[0].device_kind for h in ("H100", "H200")):   # dense bf16
    peak = 989.0
  if peak:
    out["mfu"] = 6 * n_params * tok_s / (peak * 1e12 * len(jax.devices()))
  print(json.dumps(out))
  return 0


def cmd_presets(args) -> int:
  from efficient_lm import count_params, list_presets
  from efficient_lm.training.config import DEFAULT_RUN, list_runs

  print("runs (elm train --config NAME):")
  for r in list_runs():
    print(f"  {r}{'  (default)' if r == DEFAULT_RUN else ''}")
  print("model presets (elm train --config PRESET, or --set model=PRESET):")
  for p in list_presets():
    try:
      n = count_params(p)
      print(f"  {p:28s} {n / 1e6:10.2f}M params")
    except Exception as e:  # noqa: BLE001
      print(f"  {p:28s} ({type(e).__name__})")
  return 0


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="elm", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  def add_config(sp):
    sp.add_argument("--config", default=None,
                    help="a run (mqar, shakespeare-char, ...), a model preset or a JSON file")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=50 (repeatable)")
    sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides")

  t = sub.add_parser("train", help="train (or resume) a model")
  add_config(t)
  t.add_argument("--workdir", default=None, help="run directory (default: runs/<config>)")
  d = t.add_argument_group(
      "multi-process (jax.distributed)",
      "Give these (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) on every "
      "process; on SLURM, Open MPI and multi-host TPU slices jax detects them itself.")
  d.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                 help="address of process 0's coordinator")
  d.add_argument("--num-processes", type=int, default=None)
  d.add_argument("--process-id", type=int, default=None)
  d.add_argument("--local-device-ids", default=None, metavar="I,J,...",
                 help="devices this process uses (one process per GPU: its GPU index)")
  d.add_argument("--distributed", action="store_true",
                 help="always call jax.distributed.initialize() (cluster auto-detection)")
  t.set_defaults(fn=cmd_train)

  e = sub.add_parser("eval", help="evaluate a run's checkpoint on its held-out data")
  e.add_argument("--workdir", required=True)
  e.add_argument("--step", type=int, default=None)
  e.add_argument("--batches", type=int, default=0, help="0: the whole held-out split")
  e.set_defaults(fn=cmd_eval)

  g = sub.add_parser("generate", help="sample text from a run's checkpoint")
  g.add_argument("--workdir", required=True)
  g.add_argument("--prompt", required=True)
  g.add_argument("--max-new-tokens", type=int, default=200)
  g.add_argument("--temperature", type=float, default=0.8)
  g.add_argument("--top-k", type=int, default=None)
  g.add_argument("--top-p", type=float, default=None)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--step", type=int, default=None)
  g.set_defaults(fn=cmd_generate)

  b = sub.add_parser("bench", help="train-step throughput and MFU")
  add_config(b)
  b.add_argument("--steps", type=int, default=10)
  b.add_argument("--warmup", type=int, default=2)
  b.add_argument("--peak-tflops", type=float, default=None, help="per device, for MFU")
  b.set_defaults(fn=cmd_bench)

  sub.add_parser("presets", help="list runs and model presets").set_defaults(fn=cmd_presets)
  return p


def main(argv: list[str] | None = None) -> int:
  from efficient_lm.data.sources import DataError
  from efficient_lm.training.config import ConfigError

  args = parser().parse_args(argv)
  try:
    return args.fn(args)
  except (ConfigError, DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_CONFIG


if __name__ == "__main__":
  sys.exit(main())
