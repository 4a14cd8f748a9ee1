"""CPU study: attention transfer (`efficient_lm.interop.dijiang.transfer_attention`) and logit
distillation on top of `calibrate_dijiang`, within the 5% step budget (50 steps of the teacher's
1000); the recipe of `calibrated.jsonl` (teacher d128 x 4L x 4H NeoX, char Tiny Shakespeare,
T 128, B 32, 1000 steps at lr 3e-3; val = the first 192 windows; fine-tune lr 3e-3, batches from
seed + 100, warmup 10%).

    python experiments/results/dijiang/cpu_study/transfer_study.py            # every variant
    python experiments/results/dijiang/cpu_study/transfer_study.py --only transfer25 --seeds 0,1
    python experiments/results/dijiang/cpu_study/transfer_study.py --lr-sweep  # transfer lr, held-out NMSE

The teacher is trained once (about 6 minutes on 2 CPU cores) and cached (`--teacher`). Each
variant appends one row a seed to transfer.jsonl. Step accounting: a transfer step counts as a
fine-tuning step (one forward + backward of the model), so transfer S + fine-tune 50 - S. A
distillation step also runs the teacher forward (about a third more compute a step; not charged).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import optax

from experiments import lmrun
from experiments.dijiang_conversion import teacher_config

V = dict(d_model=128, n_layers=4, n_heads=4, dropout=0.0)
BS, T, TEACHER_STEPS, BUDGET, LR = 32, 128, 1000, 50, 3e-3
RECIPE = ("d128 x 4L x 4H NeoX, T 128, B 32, 1000 steps, lr 3e-3, warmup 100, b2 0.99, wd 0.1, dropout 0, seed 0; "
          "val = first 192 windows of 128")
OUT = os.path.join(HERE, "transfer.jsonl")
# name -> (transfer steps, distillation weight alpha: loss = alpha KL(teacher || student) + (1 - alpha) CE)
VARIANTS = {
    "calibrated": (0, 0.0),
    "transfer10": (10, 0.0),
    "transfer25": (25, 0.0),
    "distill": (0, 1.0),
    "distill_mix": (0, 0.5),
    "transfer10+distill": (10, 1.0),
    "transfer25+distill": (25, 1.0),
}


def setup():
  data = lmrun.load_chars()
  return data, lmrun.eval_windows(data.val, BS, T, 192), teacher_config(V, data.vocab_size, "float32")


def load_teacher(path: str, data, val, tcfg):
  """The study's teacher: trained with the recipe and cached at `path`, or read from there."""
  from efficient_lm import create_model
  from efficient_lm.training.optim import OptimConfig
  if not os.path.exists(path):
    ocfg = OptimConfig(lr=LR, warmup_steps=100, b2=0.99, weight_decay=0.1)
    tr = lmrun.Trainer(create_model(tcfg, seed=0), ocfg, TEACHER_STEPS, seed=0)
    _, params = tr.fit(LR, lmrun.random_batches(data.train, BS, T, 0), val, eval_every=250)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
      pickle.dump({"params": jax.device_get(params)}, f)
  with open(path, "rb") as f:
    params = pickle.load(f)["params"]
  tr = lmrun.Trainer(create_model(tcfg, seed=0), OptimConfig(lr=1.0), 1, seed=0)
  return tr.merge(params), tr.evaluate(params, val)["loss"]


def calibrated_student(teacher, data, seed: int):
  """The script's conversion + calibration (one 16-window batch of seed + 7)."""
  from efficient_lm import convert_to_dijiang
  from efficient_lm.interop.dijiang import calibrate_dijiang
  student = convert_to_dijiang(teacher, seed=seed, learn_decay=True, impl="scan")
  calibrate_dijiang(student, teacher, lmrun.random_batches(data.train, 16, T, seed + 7)(0)["inputs"])
  return student


def make_distill_step(trainer, teacher, alpha: float):
  """A jitted (state, batch) -> state of `trainer`'s optimizer on alpha KL(teacher || student) +
  (1 - alpha) CE, mean over tokens (every token of these batches counts)."""
  from flax import nnx
  tgraph, tstate = nnx.split(teacher)

  def loss(params, batch):
    logp_s = jax.nn.log_softmax(trainer.merge(params)(batch["inputs"]).astype(jnp.float32), -1)
    logp_t = jax.nn.log_softmax(nnx.merge(tgraph, tstate)(batch["inputs"]).astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), -1).mean()
    ce = -jnp.take_along_axis(logp_s, batch["targets"][..., None], -1).mean()
    return alpha * kl + (1 - alpha) * ce

  @jax.jit
  def step(state, batch):
    grads = jax.grad(loss)(state["params"], batch)
    updates, opt_state = trainer.opt.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "step": state["step"] + 1}

  return step


def fine_tune(student, teacher, data, val, steps: int, alpha: float, seed: int):
  """-> val loss after `steps` steps at lr 3e-3 (the library's optimizer and schedule), CE or distillation."""
  from efficient_lm.training.optim import OptimConfig
  ocfg = OptimConfig(lr=1.0, warmup_steps=max(steps // 10, 1), b2=0.99, weight_decay=0.1)
  tr = lmrun.Trainer(student, ocfg, steps, seed=seed)
  batches = lmrun.random_batches(data.train, BS, T, seed + 100)
  if not alpha:
    rec, _ = tr.fit(LR, batches, val, log=lambda *_: None)
    return rec["eval_loss"]
  step, state = make_distill_step(tr, teacher, alpha), tr.init_state(LR)
  for s in range(steps):
    state = step(state, {k: v for k, v in batches(s).items() if k in ("inputs", "targets")})
  return tr.evaluate(state["params"], val)["loss"]


def evaluate(student, val):
  from efficient_lm.training.optim import OptimConfig
  tr = lmrun.Trainer(student, OptimConfig(lr=1.0), 1)
  return tr.evaluate(tr.params0, val)["loss"]


def run_variant(name: str, seed: int, teacher, tval: float, data, val, transfer_lr: float, log=print) -> dict:
  from efficient_lm.interop.dijiang import MIXER_PARAMS, transfer_attention
  t0 = time.time()
  s_steps, alpha = VARIANTS[name]
  student = calibrated_student(teacher, data, seed)
  before = evaluate(student, val)
  info, after_transfer = [], None
  if s_steps:   # transfer batches: their own stream (seed + 200), so the fine-tune's is the baseline's
    batches = lmrun.random_batches(data.train, BS, T, seed + 200)
    info = transfer_attention(student, teacher, lambda s: batches(s)["inputs"], s_steps, lr=transfer_lr)
    after_transfer = evaluate(student, val)
  after = fine_tune(student, teacher, data, val, BUDGET - s_steps, alpha, seed)
  row = {"variant": name, "code": "transfer_study.py + efficient_lm.interop.dijiang.transfer_attention",
         "learn_decay": True, "calib_batch": "16 x 128 train windows, seed + 7", "lr": LR, "seed": seed,
         "steps": BUDGET, "transfer_steps": s_steps, "finetune_steps": BUDGET - s_steps,
         "transfer_lr": transfer_lr if s_steps else None, "transfer_params": list(MIXER_PARAMS) if s_steps else None,
         "transfer_batches": "32 x 128 train windows, seed + 200" if s_steps else None,
         "distill_alpha": alpha, "teacher": tval, "before": before, "after_transfer": after_transfer,
         "after": after, "gap_before": before - tval,
         "gap_after_transfer": None if after_transfer is None else after_transfer - tval,
         "gap_after": after - tval, "info": info, "teacher_recipe": RECIPE,
         "hardware": "CPU, 2 cores, float32, jax " + jax.__version__, "wall_s": round(time.time() - t0, 1)}
  log(json.dumps({k: row[k] for k in ("variant", "seed", "gap_before", "gap_after_transfer", "gap_after", "wall_s")}))
  return row


def lr_sweep(teacher, data, lrs, steps: int = 25) -> list[dict]:
  """Transfer lr by the per-layer NMSE on a held-out batch (train windows of seed 300)."""
  from efficient_lm.interop.dijiang import attention_transfer_error, transfer_attention
  held = lmrun.random_batches(data.train, BS, T, 300)(0)["inputs"]
  rows = [{"lr": None, "steps": 0, "nmse_heldout": attention_transfer_error(calibrated_student(teacher, data, 0),
                                                                            teacher, held)}]
  for lr in lrs:
    student, batches = calibrated_student(teacher, data, 0), lmrun.random_batches(data.train, BS, T, 200)
    transfer_attention(student, teacher, lambda s, batches=batches: batches(s)["inputs"], steps, lr=lr)
    rows.append({"lr": lr, "steps": steps, "nmse_heldout": attention_transfer_error(student, teacher, held)})
    print(rows[-1])
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
  ap.add_argument("--seeds", default="0")
  ap.add_argument("--transfer-lr", type=float, default=3e-3, help="the sweep's best (transfer_lr_sweep.json)")
  ap.add_argument("--lr-sweep", action="store_true", help="only the transfer lr sweep (held-out NMSE)")
  ap.add_argument("--teacher", default="/tmp/dijiang_cpu_study/teacher.pkl", help="teacher cache")
  ap.add_argument("--out", default=OUT)
  args = ap.parse_args()
  data, val, tcfg = setup()
  teacher, tval = load_teacher(args.teacher, data, val, tcfg)
  print(f"teacher val {tval:.6f}")
  if args.lr_sweep:
    with open(os.path.join(HERE, "transfer_lr_sweep.json"), "w") as f:
      json.dump(lr_sweep(teacher, data, (1e-3, 3e-3, 1e-2, 3e-2)), f)
    return
  for seed in map(int, args.seeds.split(",")):
    for name in args.only.split(","):
      row = run_variant(name, seed, teacher, tval, data, val, args.transfer_lr)
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
