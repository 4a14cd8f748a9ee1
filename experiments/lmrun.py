"""What the experiments share (mqar, shakespeare, wikitext2, dijiang_conversion, moe_routing): a
lean training loop over the library's train step, and a pool of worker processes that share one
GPU.

Training (`Trainer`): the library's pure step (`efficient_lm.training.step.make_train_step`:
chunked head + loss, dropout keyed by the step) and optimizer (`make_optimizer`: AdamW with the
weight-decay mask, warmup + cosine, clipping), built at peak lr 1 and followed by
`optax.scale(lr)` whose lr lives in the optimizer state: ONE compiled step serves every learning
rate of a model shape. No Grain, no Orbax here: the GPU images lack grain, and these runs are
short (a run cut off loses at most one configuration; finished ones are already in the JSON).

Concurrency (`run_pool`): many small models use an H100 badly one at a time (each step is a few
ms of launch-bound work, and each model compiles for 20-60 s of CPU). The scripts therefore
run independent configurations as concurrent worker processes (`--workers N`), each with
`XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / N` of the GPU memory, so compilations overlap with
other workers' training and the GPU interleaves their kernels. We chose processes over
vmapping one step across learning rates because vmap would have to batch the Pallas kernels and
cuDNN attention (untested on the GPU here), and processes keep every run on exactly the
library's code path. Each worker appends its results as JSON lines to `runs/<task>.jsonl`;
the parent merges them into the results file as they arrive. `--workers 0` runs in-process
(the `--quick` CPU mode and the tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

_ORIG_JAX_PLATFORMS = os.environ.get("JAX_PLATFORMS")


def parent_on_cpu():
  """In the orchestrating process of a worker pool: keep jax (imported for run_meta and
  parameter counts) off the GPU, so that the workers get all of its memory."""
  if "jax" not in sys.modules and _ORIG_JAX_PLATFORMS is None:
    os.environ["JAX_PLATFORMS"] = "cpu"


def shared_data_dir() -> str:
  """The library's data folder (ELM_DATA_DIR, else ../shared/data); imported late, after
  `parent_on_cpu`, because the library imports jax."""
  from efficient_lm.training.config import shared_data_dir as library_data_dir  # noqa: PLC0415
  return library_data_dir()


@dataclasses.dataclass
class CharData:
  train: np.ndarray      # int32 token ids
  val: np.ndarray
  vocab_size: int
  path: str


def load_chars(limit_chars: int = 0, path: str | None = None) -> CharData:
  """Character Tiny Shakespeare: the 65-character vocabulary of the whole text; first 90% train,
  last 10% validation (nanoGPT: `data[:int(n * 0.9)]`). `limit_chars` (quick runs) keeps the
  first `limit_chars` of train and the first `max(limit_chars // 8, 4096)` of validation."""
  path = path or os.path.join(shared_data_dir(), "tinyshakespeare.txt")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  chars = sorted(set(text))
  lut = {c: i for i, c in enumerate(chars)}
  ids = np.fromiter((lut[c] for c in text), np.int32, len(text))
  at = int(len(ids) * 0.9)
  train, val = ids[:at], ids[at:]
  if limit_chars:
    train, val = train[:limit_chars], val[:max(limit_chars // 8, 4096)]
  return CharData(train=train, val=val, vocab_size=len(chars), path=path)


def add_pool_args(p) -> None:
  """The flags of the scripts that train through `run_pool` (mqar, shakespeare, wikitext2)."""
  p.add_argument("--workers", type=int, default=None, help="concurrent worker processes (0: in-process)")
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--models", default=None, help="comma-separated subset")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--time-limit", type=float, default=None,
                 help="seconds: start nothing after, stop runs there (they evaluate and report)")
  p.add_argument("--fresh", action="store_true", help="ignore finished rows of an earlier run")
  p.add_argument("--runs-dir", default=None, help="worker logs and records (default OUT/runs)")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def compute_dtype() -> str:
  import jax  # noqa: PLC0415
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def device_meta() -> dict:
  """The device facts of this (worker) process, for the results' meta."""
  import jax  # noqa: PLC0415
  dev = jax.devices()[0]
  return {"hardware": f"{len(jax.devices())} x {getattr(dev, 'device_kind', dev.platform)}",
          "platform": dev.platform, "jax": jax.__version__}


# ------------------------------------------------------------------ training


def make_opt(ocfg, steps: int, params_pure):
  """(optimizer, relative schedule): the library optimizer at peak lr 1, then scale(lr) with
  lr a traced hyperparameter in the optimizer state, so one compiled step serves every lr."""
  import optax  # noqa: PLC0415

  from efficient_lm.models import weight_decay_mask  # noqa: PLC0415
  from efficient_lm.training.optim import make_optimizer  # noqa: PLC0415
  base, schedule = make_optimizer(dataclasses.replace(ocfg, lr=1.0), steps, mask=weight_decay_mask(params_pure))
  return optax.chain(base, optax.inject_hyperparams(optax.scale)(step_size=1.0)), schedule


def set_lr(opt_state, lr: float):
  """The optimizer state of `make_opt` with the learning rate `lr` (the chain's last entry)."""
  import jax.numpy as jnp  # noqa: PLC0415
  *head, scale_state = opt_state
  hp = dict(scale_state.hyperparams)
  hp["step_size"] = jnp.asarray(lr, jnp.asarray(hp["step_size"]).dtype)
  return (*head, scale_state._replace(hyperparams=hp))


class Trainer:
  """One model shape: its initial parameters, one compiled train step and eval step; `fit`
  trains from those parameters or from any others of the same shape (another seed, a converted
  model). `model`: a ModelConfig (built here with `seed`) or a built model."""

  def __init__(self, model, ocfg, steps: int, *, seed: int = 0, loss_chunk_size: int = 1024):
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from efficient_lm.models import LM  # noqa: PLC0415
    from efficient_lm.training.step import StepOptions, make_eval_step, make_train_step  # noqa: PLC0415

    if not isinstance(model, nnx.Module):
      model = LM(model, rngs=nnx.Rngs(seed))
    self.cfg, self.steps, self.seed = model.config, steps, seed
    self.graphdef, self.params0, self.rest = self.split(model)
    self.n_params = int(sum(x.size for x in jax.tree.leaves(self.params0)))
    self.opt, self.schedule = make_opt(ocfg, steps, self.params0)
    moe = getattr(self.cfg, "n_experts", 0) > 0       # as the library's loop decides it
    opts = StepOptions(loss_chunk_size=loss_chunk_size, moe=moe, dropout=self.cfg.uses_dropout,
                       dropout_seed=seed)
    self._step = jax.jit(make_train_step(self.graphdef, self.opt, self.schedule, opts),
                         donate_argnums=(0,))
    self._eval = jax.jit(make_eval_step(self.graphdef, moe=moe, loss_chunk_size=loss_chunk_size))

  @staticmethod
  def split(model):
    """-> (graphdef, params, rest) of a model, as pure dicts."""
    from flax import nnx  # noqa: PLC0415
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def merge(self, params, rest=None):
    from flax import nnx  # noqa: PLC0415
    return nnx.merge(self.graphdef, params, self.rest if rest is None else rest)

  def init_state(self, lr: float, params=None):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    params = jax.tree.map(jnp.array, self.params0 if params is None else params)  # the step donates its state
    return {"params": params, "opt_state": set_lr(self.opt.init(params), lr),
            "step": jnp.zeros((), jnp.int32)}

  def evaluate(self, params, batches, rest=None) -> dict:
    import jax  # noqa: PLC0415
    rest = self.rest if rest is None else rest
    ce = correct = tokens = 0.0
    for b in batches:
      out = jax.device_get(self._eval(params, b, rest))
      ce += float(out["ce"])
      correct += float(out["correct"])
      tokens += float(out["tokens"])
    tokens = max(tokens, 1.0)
    return {"loss": ce / tokens, "accuracy": correct / tokens, "tokens": tokens}

  def fit(self, lr: float, next_batch: Callable[[int], dict], eval_batches, *, params=None, rest=None,
          eval_every: int = 0, log_every: int = 100, log=print, deadline: float | None = None):
    """Train at peak `lr` from `params` (default: the initial ones); `next_batch(step)` -> a
    batch dict of numpy arrays. -> (record: final eval, curves, timings; the trained params).
    The last evaluation always runs."""
    import jax  # noqa: PLC0415
    rest = self.rest if rest is None else rest
    state = self.init_state(lr, params)
    t0 = time.time()
    train_curve, eval_curve, times = [], [], []
    compile_s, mark, mark_step, nonfinite = None, None, 0, 0
    steps_done = 0
    for s in range(1, self.steps + 1):
      state, m = self._step(state, next_batch(s - 1), rest)
      steps_done = s
      if s == 1:
        jax.block_until_ready(m)
        compile_s = time.time() - t0
        mark, mark_step = time.time(), 1
      do_eval = eval_every and s % eval_every == 0 and s != self.steps
      if s % log_every == 0 or s == self.steps or do_eval:
        host = jax.device_get(m)
        now = time.time()
        if s > mark_step:
          times.append((now - mark) / (s - mark_step))
        nonfinite += not bool(host["finite"])
        train_curve.append([s, float(host["loss"]), float(host["accuracy"])])
        if do_eval:
          ev = self.evaluate(state["params"], eval_batches, rest)
          eval_curve.append([s, ev["loss"], ev["accuracy"]])
          log(f"    step {s}: train {float(host['loss']):.4f} eval {ev['loss']:.4f} "
              f"acc {ev['accuracy']:.3f}")
        mark, mark_step = time.time(), s
        if deadline is not None and time.time() > deadline:
          log(f"    deadline reached at step {s}: stopping this run early")
          break
    ev = self.evaluate(state["params"], eval_batches, rest)
    eval_curve.append([steps_done, ev["loss"], ev["accuracy"]])
    record = {"eval_loss": ev["loss"], "eval_accuracy": ev["accuracy"], "steps": steps_done,
              "train_curve": train_curve, "eval_curve": eval_curve,
              "step_s": statistics.median(times) if times else None,
              "compile_s": round(compile_s or 0.0, 2), "wall_s": round(time.time() - t0, 2),
              "nonfinite_steps": nonfinite}
    return record, state["params"]


def val_record(rec: dict, *, lr: float, seed: int, batch_size: int, seq_len: int) -> dict:
  """A `Trainer.fit` record in the schema of the analysis experiments' results files
  (dijiang.json, moe_routing.json): validation loss and curve, train-loss curve, step time."""
  return {"val_loss": rec["eval_loss"], "val_curve": [[s, loss] for s, loss, _ in rec["eval_curve"]],
          "train_curve": [[s, loss] for s, loss, _ in rec["train_curve"]], "lr": lr, "seed": seed,
          "steps": rec["steps"], "batch_size": batch_size, "seq_len": seq_len,
          "tokens": rec["steps"] * batch_size * seq_len, "step_time_s": rec["step_s"],
          "compile_s": rec["compile_s"], "wall_s": rec["wall_s"]}


# ------------------------------------------------------------------ token-stream LMs


def window_batch(tokens, starts, seq_len: int, mask=None) -> dict:
  """Windows tokens[s : s + T + 1] for each start s -> a batch (one document per row)."""
  import numpy as np  # noqa: PLC0415
  idx = np.asarray(starts)[:, None] + np.arange(seq_len + 1)[None]
  w = tokens[idx]
  return {"inputs": w[:, :-1].astype(np.int32), "targets": w[:, 1:].astype(np.int32),
          "segment_ids": None,
          "loss_mask": np.ones((len(starts), seq_len), np.float32) if mask is None else mask}


def random_batches(tokens, batch: int, seq_len: int, seed: int):
  """next_batch(step): `batch` uniformly random windows of the stream (nanoGPT's get_batch)."""
  import numpy as np  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  return lambda step: window_batch(tokens, rng.integers(0, tokens.size - seq_len - 1, batch), seq_len)


def eval_windows(tokens, batch: int, seq_len: int, max_windows: int = 0) -> list[dict]:
  """Every non-overlapping window of the stream (or the first `max_windows`), in batches; the
  last batch is padded with rows of zero loss mask."""
  import numpy as np  # noqa: PLC0415
  n = (tokens.size - 1) // seq_len
  if max_windows:
    n = min(n, max_windows)
  starts = np.arange(n) * seq_len
  out = []
  for i in range(0, n, batch):
    s = starts[i:i + batch]
    mask = np.ones((batch, seq_len), np.float32)
    if s.size < batch:
      mask[s.size:] = 0.0
      s = np.concatenate([s, np.zeros(batch - s.size, s.dtype)])
    out.append(window_batch(tokens, s, seq_len, mask))
  return out


def match_params(preset: str, base: dict, target: int, outer: list[dict], key: str | None = None,
                 values=(), rel_tol: float = 0.01):
  """Parameter matching: for each option of `outer` (override dicts, in order of preference),
  bisect `key` over ascending `values` (the count grows with it) for the count nearest
  `target`; the first option within rel_tol wins, else the nearest overall.
  -> (overrides on top of `base`, count)."""
  from efficient_lm import count_params  # noqa: PLC0415
  best = None
  values = list(values)
  for opt in outer or [{}]:
    over = {**base, **opt}
    if key is None or not values:
      found = [(over, count_params(preset, **over))]
    else:
      count = lambda x, over=over: count_params(preset, **{**over, key: x})
      lo, hi = 0, len(values) - 1
      while lo < hi:  # smallest index whose count >= target (or the last)
        mid = (lo + hi) // 2
        if count(values[mid]) >= target:
          hi = mid
        else:
          lo = mid + 1
      found = [({**over, key: values[i]}, count(values[i])) for i in {lo, max(lo - 1, 0)}]
    for o, n in sorted(found, key=lambda x: abs(x[1] - target)):
      if best is None or abs(n - target) < abs(best[1] - target):
        best = (o, n)
    if abs(best[1] - target) <= rel_tol * target:
      return best
  return best


def curve_summary(rec: dict) -> dict:
  return {"train": [[s, round(l, 5)] for s, l, _ in rec["train_curve"]],
          "eval": [[s, round(l, 5)] for s, l, _ in rec["eval_curve"]]}


# ------------------------------------------------------------------ the worker pool


def run_pool(tasks: list[dict], *, script: str, out: str, workers: int,
             work: Callable[[dict, Callable[[dict], None]], None],
             on_record: Callable[[dict, dict], None], on_failure: Callable[[dict, str], None],
             worker_args: tuple = (), time_limit: float | None = None, log=print,
             run_dir: str | None = None) -> bool:
  """Run `work(task, emit)` for every task: in this process (workers=0) or in up to `workers`
  concurrent processes `python script --worker TASK.json --out OUT ...worker_args`. Every
  `emit(record)` reaches `on_record(task, record)` in this process as it happens.
  Worker files (task, JSON lines, log) go to `run_dir` (default OUT/runs).
  `time_limit` (s): no task starts after it, each task gets `task["deadline"]` (epoch s; its
  runs stop training there and evaluate), and workers still alive 90 s later are killed.
  -> False when the time limit cut the pool short."""
  started = time.time()
  deadline = None if time_limit is None else started + time_limit
  tasks = [dict(t, deadline=deadline) for t in tasks]
  if workers <= 0:
    for task in tasks:
      if deadline is not None and time.time() > deadline:
        return False
      try:
        work(task, lambda rec, task=task: on_record(task, rec))
      except Exception as e:  # keep the other tasks
        import traceback  # noqa: PLC0415
        on_failure(task, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
    return True

  run_dir = run_dir or os.path.join(out, "runs")
  os.makedirs(run_dir, exist_ok=True)
  env = dict(os.environ)
  if _ORIG_JAX_PLATFORMS is None:
    env.pop("JAX_PLATFORMS", None)
  else:
    env["JAX_PLATFORMS"] = _ORIG_JAX_PLATFORMS
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / workers:.3f}")
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  env["PYTHONUNBUFFERED"] = "1"
  pending = list(tasks)
  running = {}  # id -> (task, Popen, jsonl path, offset, log file)

  def drain(tid):
    task, proc, path, offset, logf = running[tid]
    if not os.path.exists(path):
      return
    with open(path, encoding="utf-8") as f:
      f.seek(offset)
      while True:
        line = f.readline()
        if not line.endswith("\n"):
          break
        offset = f.tell()
        try:
          on_record(task, json.loads(line))
        except json.JSONDecodeError:
          log(f"  [{tid}] unreadable line: {line[:200]!r}")
    running[tid] = (task, proc, path, offset, logf)

  def tail(path, n=2000):
    try:
      with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]
    except OSError:
      return ""

  cut = False
  try:
    while pending or running:
      now = time.time()
      if deadline is not None and now > deadline and not cut:
        cut = True
        log(f"time limit {time_limit:.0f} s reached: {len(running)} worker(s) finish their "
            f"current run, {len(pending)} task(s) not started")
        pending.clear()
      if cut and now > deadline + 90:
        for _, proc, *_ in running.values():
          if proc.poll() is None:
            proc.kill()
      while pending and len(running) < workers:
        task = pending.pop(0)
        tid = task["id"]
        task_path = os.path.join(run_dir, f"{tid}.task.json")
        with open(task_path, "w", encoding="utf-8") as f:
          json.dump(task, f)
        path = os.path.join(run_dir, f"{tid}.jsonl")
        if os.path.exists(path):
          os.remove(path)
        logf = os.path.join(run_dir, f"{tid}.log")
        with open(logf, "w") as lf:
          proc = subprocess.Popen([sys.executable, script, "--worker", task_path, "--out", out,
                                   *worker_args], stdout=lf, stderr=subprocess.STDOUT, env=env,
                                  cwd=ROOT)
        running[tid] = (task, proc, path, 0, logf)
        log(f"  started {tid} (pid {proc.pid}; log {logf})")
      time.sleep(1.0)
      for tid in list(running):
        drain(tid)
        task, proc, _, _, logf = running[tid]
        rc = proc.poll()
        if rc is not None:
          drain(tid)
          del running[tid]
          if rc != 0:
            on_failure(task, f"worker exit code {rc}; log tail:\n{tail(logf)}")
          log(f"  finished {tid} (exit {rc}); {len(running)} running, {len(pending)} waiting")
  finally:
    for _, proc, *_ in running.values():
      if proc.poll() is None:
        proc.kill()
  return not cut


def pool_script_start(args, name: str, work, plot) -> str | None:
  """The start of a worker-pool experiment's main: its results folder (made), or None when this
  process was a worker (it ran `work`) or was asked only to plot."""
  from experiments.common import results_dir  # noqa: PLC0415
  out = args.out or results_dir(name)
  os.makedirs(out, exist_ok=True)
  if args.worker:
    worker_main(args.worker, work)
    return None
  if args.plot_only:
    plot(out)
    return None
  return out


def worker_main(task_path: str, work: Callable[[dict, Callable[[dict], None]], None]) -> None:
  """The worker side of `run_pool`: run one task, one JSON line per emitted record."""
  with open(task_path, encoding="utf-8") as f:
    task = json.load(f)
  path = os.path.join(os.path.dirname(task_path), f"{task['id']}.jsonl")

  def emit(rec):
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(rec, default=str) + "\n")

  work(task, emit)


def fmt(x, nd=3) -> str:
  import math  # noqa: PLC0415
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{x:.{nd}f}"


class Results:
  """A results file {"meta", "rows"} rewritten after every record; rows of an earlier run of the
  same version are kept (and their tasks skipped) unless `fresh`."""

  def __init__(self, path: str, version: str, *, fresh: bool = False, key=lambda r: r["model"],
               seed=None, **meta_extra):
    from experiments.common import read_json, run_meta  # noqa: PLC0415
    self.path, self.key, self.seed = path, key, seed
    self.started = time.time()
    old = read_json(path) if os.path.exists(path) and not fresh else None
    if old is not None and old.get("meta", {}).get("version") != version:
      old = None
    self.rows = list(old["rows"]) if old else []
    # the device facts come from the workers (this process may run on the CPU); kept on resume
    self.device = {k: old["meta"][k] for k in ("hardware", "platform", "jax") if old and k in old["meta"]}
    self.meta = run_meta(seed=seed, started=self.started, version=version, failed=[], **meta_extra)

  def done(self, steps: int | None = None) -> set:
    """Keys of finished rows (with `steps`: only those that trained all of them)."""
    return {self.key(r) for r in self.rows if steps is None or r.get("steps", 0) >= steps}

  def save(self) -> None:
    from experiments.common import run_meta, write_json  # noqa: PLC0415
    self.meta.update(run_meta(seed=self.seed, started=self.started))
    self.meta.update(self.device)
    write_json(self.path, {"meta": self.meta, "rows": self.rows})

  def on_record(self, task, rec) -> None:
    kind = rec.get("kind")
    if kind == "device":
      self.device.update({k: rec[k] for k in ("hardware", "platform", "jax")})
    elif kind == "row":
      self.rows = [r for r in self.rows if self.key(r) != self.key(rec["row"])] + [rec["row"]]
    elif kind in ("failed", "skipped"):
      self.meta["failed"].append({"task": task["id"], **{k: v for k, v in rec.items() if k != "kind"}})
    self.save()

  def on_failure(self, task, msg) -> None:
    print(f"task {task['id']} failed: {msg[-800:]}", flush=True)
    self.meta["failed"].append({"task": task["id"], "error": msg[-2000:]})
    self.save()
