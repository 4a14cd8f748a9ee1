"""Measures the library fast paths of issue 11 in one process (meant for the H100).

    python experiments/bench_fastpaths.py --out experiments/results/fastpaths   [--quick] [--skip-step]

Sections (each writes its rows as soon as it finishes, so a cut-off run keeps what it measured):
- moe: the MoE layer of `rmoe-paper` shape (8x2048 tokens, top-4 of 16 experts, d 1280, expert
  hidden 448, bf16): routing + dropless dispatch + the fused gate/up and down ragged dots,
  forward and forward+backward (grads of x and the three expert weights), with
  `jax.lax.ragged_dot` ("xla") and tokamax's `ragged_dot` ("tokamax"); also the bare gate/up
  ragged dot (65536x1280 @ 16x1280x896) of ../shared/spec/platform.md. Agreement of the two
  paths on this device (relative error of outputs and gradients).
- loss: the LM head + loss at vocab 126464, d 2048, 8x2048 tokens (bf16 compute, float32
  weight), value and gradient of h and w: plain full logits vs the chunked custom-VJP loss.
  Compiled memory (temp and total) and the device peak (`peak_bytes_in_use`, chunked first, so
  each peak is that path's), wall time.
- attention: `efficient_lm.kernels.dot_product_attention` 8x2048x16x128 bf16, causal and
  window 512, the chosen kernel (cuDNN on NVIDIA) vs XLA, with agreement.
- step: the `rmoe-paper` train step at shortened depth (4 layers, 8x2048 tokens, bf16
  compute, AdamW): before (XLA ragged dot and attention, plain loss) and after (auto dispatch,
  chunked loss), tokens/s and MFU (6 x active params per token, 989 TFLOP/s peak).

Median of `--iters` synchronised runs after `--warmup`. Writes fastpaths.json and fastpaths.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_lm import kernels  # noqa: E402
from efficient_lm.layers.moe import expert_mlp, route  # noqa: E402

PEAK_TFLOPS = 989.0   # H100 SXM dense bf16


def median_ms(fn, iters, warmup):
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compiled_memory(jitted, *args):
  try:
    m = jitted.lower(*args).compile().memory_analysis()
    return {"temp_bytes": int(m.temp_size_in_bytes),
            "total_bytes": int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                               - m.alias_size_in_bytes)}
  except Exception as e:  # best effort on some backends
    return {"memory_error": f"{type(e).__name__}: {e}"}


def peak_bytes():
  try:
    return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
  except Exception:
    return None


# ----------------------------------------------------------------------------- MoE

def moe_problem(quick, rng):
  """The MoE layer's inputs at rmoe-paper shape (quick: tiny), drawn from rng: x [N, D], the
  router's [D, E], the experts' (gate, up, down), a cotangent like x, and top-k."""
  n, d, hid, e, k = (8 * 2048, 1280, 448, 16, 4) if not quick else (512, 64, 32, 4, 2)
  bf = jnp.bfloat16
  x = jnp.asarray(rng.standard_normal((n, d)), bf)
  w_router = jnp.asarray(rng.standard_normal((d, e)) * d ** -0.5, jnp.float32)
  ws = tuple(jnp.asarray(rng.standard_normal(s) * 0.02, bf) for s in ((e, d, hid), (e, d, hid), (e, hid, d)))
  cot = jnp.asarray(rng.standard_normal((n, d)), bf)
  return x, w_router, ws, cot, k


def moe_layer(w_router, k, impl):
  """(x, w_gate, w_up, w_down) -> the MoE layer's output: linear router, top-k, dropless experts."""
  def f(x, wg, wu, wd):
    _, idx, wts = route(jnp.dot(x.astype(jnp.float32), w_router), k)
    return expert_mlp(x, idx, wts, wg, wu, wd, impl=impl)
  return f


def bench_moe(report, a):
  rng = np.random.default_rng(0)
  x, w_router, ws, cot, k = moe_problem(a.quick, rng)
  (n, d), (e, _, hid) = x.shape, ws[0].shape
  bf = jnp.bfloat16

  def layer(impl):
    f = moe_layer(w_router, k, impl)
    fwd = jax.jit(f)
    fwd_bwd = jax.jit(lambda x, *w: jax.vjp(f, x, *w)[1](cot))
    return fwd, fwd_bwd

  flop_fwd = 2 * n * k * (d * 2 * hid + hid * d)
  sizes = jnp.asarray(np.bincount(rng.integers(0, e, n * k), minlength=e), jnp.int32)
  lhs = jnp.asarray(rng.standard_normal((n * k, d)), bf)
  rhs = jnp.asarray(rng.standard_normal((e, d, 2 * hid)) * 0.02, bf)
  rd_cot = jnp.asarray(rng.standard_normal((n * k, 2 * hid)), bf)
  outs = {}
  for impl in ("xla", "tokamax"):
    if impl == "tokamax" and kernels.tokamax_module() is None:
      report["moe"].append({"impl": impl, "error": "tokamax not importable (or unsuited to this jax)"})
      continue
    fwd, fwd_bwd = layer(impl)
    for mode, fn in (("fwd", lambda: fwd(x, *ws)), ("fwd_bwd", lambda: fwd_bwd(x, *ws))):
      row = {"what": "moe_layer", "impl": impl, "mode": mode, "tokens": n, "top_k": k, "experts": e,
             "d": d, "hidden": hid}
      try:
        outs[(impl, mode)] = jax.device_get(fn())
        row["ms"] = median_ms(fn, a.iters, a.warmup)
        row["expert_tflops"] = flop_fwd * (3 if mode == "fwd_bwd" else 1) / (row["ms"] * 1e-3) / 1e12
      except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
      report["moe"].append(row)
      write(report, a.out)
    rd = jax.jit(lambda l, r: kernels.ragged_dot(l, r, sizes, impl=impl))
    rd_bwd = jax.jit(lambda l, r: jax.vjp(lambda l, r: kernels.ragged_dot(l, r, sizes, impl=impl), l, r)[1](rd_cot))
    for mode, fn in (("fwd", lambda: rd(lhs, rhs)), ("fwd_bwd", lambda: rd_bwd(lhs, rhs))):
      row = {"what": "ragged_dot_gate_up", "impl": impl, "mode": mode, "m": n * k, "k": d, "n": 2 * hid,
             "groups": e}
      try:
        row["ms"] = median_ms(fn, a.iters, a.warmup)
        row["tflops"] = 2 * n * k * d * 2 * hid * (3 if mode == "fwd_bwd" else 1) / (row["ms"] * 1e-3) / 1e12
      except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
      report["moe"].append(row)
  if kernels.tokamax_module() is not None:
    _moe_breakdown(report, a, x, w_router, ws, cot, k)
  if ("tokamax", "fwd") in outs and ("xla", "fwd") in outs:
    check = {"out": rel_err(outs[("tokamax", "fwd")], outs[("xla", "fwd")])}
    for name, g1, g0 in zip(("dx", "dw_gate", "dw_up", "dw_down"), outs[("tokamax", "fwd_bwd")],
                            outs[("xla", "fwd_bwd")]):
      check[name] = rel_err(g1, g0)
    report["moe_agreement_rel_err"] = check
  ms = {(r["impl"], r["mode"]): r["ms"] for r in report["moe"] if r.get("what") == "moe_layer" and "ms" in r}
  for mode in ("fwd", "fwd_bwd"):
    if ("xla", mode) in ms and ("tokamax", mode) in ms:
      report["summary"][f"moe_{mode}_speedup_tokamax_over_xla"] = ms[("xla", mode)] / ms[("tokamax", mode)]
  write(report, a.out)


def _moe_breakdown(report, a, x, w_router, ws, cot, k):
  """Where the tokamax layer's fwd+bwd time goes: the same layer with the router's gradient
  stopped, and the two ragged dots alone on already-sorted rows."""
  n, e = x.shape[0], ws[0].shape[0]

  def no_router_grad(x, wg, wu, wd):
    _, idx, wts = route(jnp.dot(jax.lax.stop_gradient(x).astype(jnp.float32), w_router), k)
    return expert_mlp(x, idx, jax.lax.stop_gradient(wts), wg, wu, wd, impl="tokamax")

  sizes = jnp.full((e,), n * k // e, jnp.int32)
  x_rep = jnp.repeat(x, k, axis=0)

  def matmuls_only(xs, wg, wu, wd):
    hid = wg.shape[-1]
    gu = kernels.ragged_dot(xs, jnp.concatenate([wg, wu], -1), sizes, impl="tokamax")
    return kernels.ragged_dot(jax.nn.silu(gu[:, :hid]) * gu[:, hid:], wd, sizes, impl="tokamax")

  def matmuls_split(xs, wg, wu, wd):
    g = kernels.ragged_dot(xs, wg, sizes, impl="tokamax")
    u = kernels.ragged_dot(xs, wu, sizes, impl="tokamax")
    return kernels.ragged_dot(jax.nn.silu(g) * u, wd, sizes, impl="tokamax")

  h_rep = jnp.repeat(x[:, :ws[2].shape[1]], k, axis=0)

  def down_only(h, wd):
    return kernels.ragged_dot(h, wd, sizes, impl="tokamax")

  cot_rep = jnp.repeat(cot, k, axis=0)
  for what, f, args, c in (("moe_layer_no_router_grad", no_router_grad, (x,) + ws, cot),
                           ("moe_matmuls_only", matmuls_only, (x_rep,) + ws, cot_rep),
                           ("moe_matmuls_only_gate_up_split", matmuls_split, (x_rep,) + ws, cot_rep),
                           ("ragged_dot_down", down_only, (h_rep, ws[2]), cot_rep)):
    fn = jax.jit(lambda *args, f=f, c=c: jax.vjp(f, *args)[1](c))
    row = {"what": what, "impl": "tokamax", "mode": "fwd_bwd"}
    try:
      row["ms"] = median_ms(lambda: fn(*args), a.iters, a.warmup)
    except Exception as err:
      row["error"] = f"{type(err).__name__}: {err}"[:2000]
    report["moe"].append(row)


# ----------------------------------------------------------------------------- loss

def bench_loss(report, a):
  n, d, v = (8 * 2048, 2048, 126464) if not a.quick else (1024, 64, 4096)
  chunk = a.loss_chunk
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((v, d)) * 0.02, jnp.float32)   # tied embedding, float32 param
  targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  mask = jnp.asarray(rng.random(n) > 0.05, jnp.float32)

  def make(kind):
    def loss(h, w):
      wc = w.astype(jnp.bfloat16)
      if kind == "plain":
        ce, z, _ = kernels.plain_token_stats(h, wc, targets, mask, w_layout="vd")
      else:
        ce, z, _ = kernels.chunked_token_stats(h, wc, targets, mask, w_layout="vd", chunk_size=chunk)
      return (ce + 1e-4 * z) / jnp.sum(mask)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  vals = {}
  for kind in ("chunked", "plain"):   # chunked first: the device peak only grows
    fn = make(kind)
    row = {"what": "lm_loss_value_and_grad", "impl": kind, "tokens": n, "d": d, "vocab": v,
           "chunk_size": chunk if kind == "chunked" else None,
           "f32_logits_bytes": n * v * 4}
    row.update(compiled_memory(fn, h, w))
    try:
      out = fn(h, w)
      vals[kind] = jax.device_get(out)
      row["device_peak_bytes"] = peak_bytes()
      row["ms"] = median_ms(lambda: fn(h, w), a.iters, a.warmup)
    except Exception as err:
      row["error"] = f"{type(err).__name__}: {err}"[:2000]
    report["loss"].append(row)
    write(report, a.out)
  if len(vals) == 2:
    (l0, (dh0, dw0)), (l1, (dh1, dw1)) = vals["plain"], vals["chunked"]
    report["loss_agreement_rel_err"] = {"loss": rel_err(l1, l0), "dh": rel_err(dh1, dh0), "dw": rel_err(dw1, dw0)}
  rows = {r["impl"]: r for r in report["loss"]}
  if all("temp_bytes" in rows.get(k, {}) for k in ("plain", "chunked")):
    report["summary"]["loss_temp_memory_ratio_chunked_over_plain"] = (
        rows["chunked"]["temp_bytes"] / rows["plain"]["temp_bytes"])
  write(report, a.out)


# ----------------------------------------------------------------------------- attention

def bench_attention(report, a):
  b, t, nh, hd = (8, 2048, 16, 128) if not a.quick else (2, 256, 4, 64)
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, nh, hd)), jnp.bfloat16) for _ in range(3))
  cot = jnp.asarray(rng.standard_normal((b, t, nh, hd)), jnp.bfloat16)
  chosen = kernels.resolve_attention("auto", jnp.bfloat16, hd)
  for window in (None, 512):
    outs = {}
    for impl in sorted({"xla", chosen}):
      f = lambda q, k, v, impl=impl: kernels.dot_product_attention(q, k, v, is_causal=True, window=window,
                                                                   scale=hd ** -0.5, impl=impl)
      fwd = jax.jit(f)
      fwd_bwd = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](cot))
      for mode, fn in (("fwd", lambda: fwd(q, k, v)), ("fwd_bwd", lambda: fwd_bwd(q, k, v))):
        row = {"what": "attention", "impl": impl, "mode": mode, "window": window, "shape": [b, t, nh, hd]}
        try:
          outs[(impl, mode)] = jax.device_get(fn())
          row["ms"] = median_ms(fn, a.iters, a.warmup)
        except Exception as err:
          row["error"] = f"{type(err).__name__}: {err}"[:2000]
        report["attention"].append(row)
    if chosen != "xla" and (chosen, "fwd") in outs and ("xla", "fwd") in outs:
      report.setdefault("attention_agreement_rel_err", {})[f"{chosen}_window_{window}"] = {
          "out": rel_err(outs[(chosen, "fwd")], outs[("xla", "fwd")]),
          **{n: rel_err(g1, g0) for n, g1, g0 in zip(("dq", "dk", "dv"), outs[(chosen, "fwd_bwd")],
                                                       outs[("xla", "fwd_bwd")])}}
    write(report, a.out)


# ----------------------------------------------------------------------------- train step

def bench_step(report, a):
  import optax
  from flax import nnx

  import efficient_lm
  from efficient_lm.training.step import StepOptions, make_train_step

  layers, (b, t) = (4, (8, 2048)) if not a.quick else (2, (2, 128))
  over = dict(n_layers=layers, dtype="bfloat16")
  if a.quick:
    over.update(d_model=64, n_heads=4, expert_hidden=32, vocab_size=512)
  rng = np.random.default_rng(3)
  for variant, use, chunk in (("before", dict(ragged_dot="xla", attention="xla"), 0), ("after", {}, a.loss_chunk)):
    row = {"what": "rmoe_paper_train_step", "variant": variant, "n_layers": layers, "batch": [b, t],
           "loss_chunk_size": chunk, "kernels": use or "auto"}
    try:
      with kernels.use(**use):
        model = efficient_lm.create_model("rmoe-paper", **over)
        cfg = model.config
        gd, params, rest = nnx.split(model, nnx.Param, ...)
        n_total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
        n_expert = sum(int(np.prod(p.shape)) for path, p in jax.tree_util.tree_leaves_with_path(params)
                       if any(str(getattr(kk, "key", "")) in ("w_gate", "w_up", "w_down") for kk in path))
        n_active = n_total - n_expert + n_expert * cfg.top_k / cfg.n_experts
        opt = optax.adamw(1e-4, weight_decay=0.1)
        state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
        step = jax.jit(make_train_step(gd, opt, lambda s: 1e-4, StepOptions(moe=True, loss_chunk_size=chunk)),
                       donate_argnums=0)
        inputs = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
        batch = {"inputs": inputs, "targets": jnp.roll(inputs, -1, 1),
                 "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.float32)}
        row["resolved"] = {"ragged_dot": kernels.resolve_ragged_dot(),
                           "attention": kernels.resolve_attention("auto", jnp.bfloat16, cfg.attn_head_dim)}
        holder = {"s": state}

        def run():
          holder["s"], m = step(holder["s"], batch, rest)
          return m["loss"]
        row["first_loss"] = float(run())
        row["ms"] = median_ms(run, max(3, a.iters // 3), max(2, a.warmup))
        row["tokens_per_s"] = b * t / (row["ms"] * 1e-3)
        row["active_params"] = n_active
        row["mfu"] = 6 * n_active * row["tokens_per_s"] / (PEAK_TFLOPS * 1e12)
        row["device_peak_bytes"] = peak_bytes()
        del holder, state
    except Exception as err:
      row["error"] = f"{type(err).__name__}: {err}"[:2000]
      traceback.print_exc()
    report["step"].append(row)
    write(report, a.out)
  ok = {r["variant"]: r for r in report["step"] if "tokens_per_s" in r}
  if len(ok) == 2:
    report["summary"]["step_speedup_after_over_before"] = ok["after"]["tokens_per_s"] / ok["before"]["tokens_per_s"]
  write(report, a.out)


# ----------------------------------------------------------------------------- output

def write(report, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "fastpaths.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  try:
    plot(report, os.path.join(out, "fastpaths.png"))
  except Exception as err:  # never lose the JSON to a plotting problem
    report["plot_error"] = f"{type(err).__name__}: {err}"


def _panels(report):
  """[(title, [(label, value)])] for the three headline comparisons."""
  panels = []
  moe = {(r["impl"], r["mode"]): r["ms"] for r in report["moe"] if r.get("what") == "moe_layer" and "ms" in r}
  if moe:
    panels.append(("MOE LAYER MS", [(f"{i} {m}".upper().replace("_", "+"), v) for (i, m), v in sorted(moe.items())]))
  loss = [(r["impl"].upper(), r["temp_bytes"] / 2 ** 30) for r in report["loss"] if "temp_bytes" in r]
  if loss:
    panels.append(("LOSS TEMP GIB", loss))
  step = [(r["variant"].upper(), r["tokens_per_s"] / 1e3) for r in report["step"] if "tokens_per_s" in r]
  if step:
    panels.append(("STEP KTOK/S", step))
  return panels


def plot(report, path):
  panels = _panels(report)
  if not panels:
    return
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    _plain_png(panels, report.get("device", ""), path)
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
  axes = np.atleast_1d(axes)
  for ax, (title, bars) in zip(axes, panels):
    ax.bar(range(len(bars)), [v for _, v in bars], color="tab:blue")
    ax.set_xticks(range(len(bars)), [l.lower() for l, _ in bars], rotation=20, ha="right", fontsize=8)
    for i, (_, val) in enumerate(bars):
      ax.text(i, val, f"{val:.3g}", ha="center", va="bottom", fontsize=8)
    ax.set_title(title.lower())
  fig.suptitle(f"issue 11 fast paths, {report.get('device', '')}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# A 3x5 bitmap font, so the PNG needs nothing beyond numpy and zlib.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "+": "000010111010000",
    "/": "001001010100100", " ": "000000000000000", "-": "000000111000000", "A": "010101111101101",
    "B": "110101110101110", "C": "111100100100111", "D": "110101101101110", "E": "111100110100111",
    "F": "111100110100100", "G": "111100101101111", "H": "101101111101101", "I": "111010010010111",
    "J": "001001001101111", "K": "101101110101101", "L": "100100100100111", "M": "101111111101101",
    "N": "110101101101101", "O": "111101101101111", "P": "111101111100100", "Q": "111101101111001",
    "R": "110101110101101", "S": "111100111001111", "T": "111010010010010", "U": "101101101101111",
    "V": "101101101101010", "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010",
    "Z": "111001010100111", "_": "000000000000111", "(": "010100100100010", ")": "010001001001010",
}


def _text(img, x, y, s, scale=2):
  for ch in s.upper():
    bits = _FONT.get(ch, _FONT[" "])
    for i, bit in enumerate(bits):
      if bit == "1":
        r, c = divmod(i, 3)
        img[y + r * scale: y + (r + 1) * scale, x + c * scale: x + (c + 1) * scale] = 0
    x += 4 * scale


def _plain_png(panels, device, path):
  pw, ph, top = 360, 300, 40
  img = np.full((ph + top, pw * len(panels), 3), 255, np.uint8)
  _text(img, 10, 10, f"ISSUE 11 FAST PATHS {device}"[:80], 2)
  for p, (title, bars) in enumerate(panels):
    x0 = p * pw
    _text(img, x0 + 10, top, title, 2)
    vmax = max(v for _, v in bars) or 1.0
    bw = (pw - 40) // max(len(bars), 1)
    for i, (label, val) in enumerate(bars):
      hgt = int((ph - 110) * val / vmax)
      x = x0 + 20 + i * bw
      y_base = top + ph - 50
      img[y_base - hgt: y_base, x + 4: x + bw - 4] = (31, 119, 180)
      _text(img, x + 4, y_base - hgt - 14, f"{val:.3g}", 2)
      _text(img, x + 4, y_base + 6, label[:12], 1)
      _text(img, x + 4, y_base + 14, label[12:24], 1)
  raw = b"".join(b"\x00" + row.tobytes() for row in img)
  chunk = lambda tag, data: (len(data).to_bytes(4, "big") + tag + data
                             + zlib.crc32(tag + data).to_bytes(4, "big"))
  hdr = img.shape[1].to_bytes(4, "big") + img.shape[0].to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", hdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


NAME, FILE = "fastpaths", "fastpaths.json"


def _run30_moe_rows(results_dir: str) -> list[str]:
  """The MoE layer with the Pallas weight gradient and row gather (session 12, run 30: one H100
  call that ran out of device time inside bench_fastpaths' MoE section, so the layer's fwd+bwd
  comes from moe_variants.py run a minute earlier in the same call)."""
  try:
    with open(os.path.join(results_dir, "run30_fastpaths.json")) as f:
      xla = {x["mode"]: x["ms"] for x in json.load(f)["moe"] if x.get("what") == "moe_layer" and x["impl"] == "xla"}
    with open(os.path.join(results_dir, "run30_moe_variants.json")) as f:
      base = next(r for r in json.load(f)["rows"] if r["variant"] == "base")
  except (OSError, StopIteration, KeyError):
    return []
  ours = base["fwd_bwd_ms"]
  return [f"| MoE layer, rmoe-paper shape, fwd+bwd, Pallas weight gradient and row gather (run 30) | "
          f"{xla['fwd_bwd']:.2f} ms | {ours:.2f} ms (round 2: {base['fwd_bwd_ms_round2']:.2f}) | "
          f"{xla['fwd_bwd'] / ours:.1f}x |"]


def markdown(results_dir: str) -> str:
  """README table of the fast paths from fastpaths.json."""
  with open(os.path.join(results_dir, FILE)) as f:
    r = json.load(f)
  moe = {(x["what"], x["impl"], x["mode"]): x["ms"] for x in r["moe"] if "ms" in x}
  step = {x["variant"]: x for x in r["step"] if "tokens_per_s" in x}
  lines = [f"Fast paths ({r['device']}, jax {r['jax']}, tokamax {r.get('tokamax')}; median of {r['iters']}):", "",
           "| what | XLA | fast path | ratio |", "|---|---|---|---|"]
  if "ragged_dot_weight_grad" not in r.get("resolved", {}):
    lines[0] += (" the tokamax rows take tokamax's own weight gradient, whose results varied by 2-12% between"
                 " runs on the H100 (experiments/NOTES.md, session 11). The library now computes it with a Pallas"
                 " kernel and gathers the token rows with another (run 30 row: its XLA column is bench_fastpaths'"
                 " XLA layer, its fast column moe_variants.py's library layer, in one device call; every gradient"
                 " within 1.5e-2 of a float32 reference, bf16 rounding).")
  for what, label in (("ragged_dot_gate_up", "ragged_dot 65536x1280 @ 16x1280x896"), ("moe_layer", "MoE layer, rmoe-paper shape")):
    for mode in ("fwd", "fwd_bwd"):
      a, b = moe.get((what, "xla", mode)), moe.get((what, "tokamax", mode))
      if a and b:
        lines.append(f"| {label}, {mode.replace('_', '+')} | {a:.2f} ms | {b:.2f} ms (tokamax) | {a / b:.1f}x |")
  if len(step) == 2:
    b, a = step["before"], step["after"]
    lines.append(f"| rmoe-paper train step ({a['n_layers']} layers, {a['batch'][0]}x{a['batch'][1]} tokens) | "
                 f"{b['tokens_per_s'] / 1e3:.1f}k tok/s, MFU {b['mfu'] * 100:.1f}% | {a['tokens_per_s'] / 1e3:.1f}k tok/s, "
                 f"MFU {a['mfu'] * 100:.1f}% | {a['tokens_per_s'] / b['tokens_per_s']:.1f}x |")
  lines += _run30_moe_rows(results_dir)
  loss = r["summary"].get("loss_temp_memory_ratio_chunked_over_plain")
  if loss:
    lines.append(f"| LM loss at vocab 126464: compiled temp memory | plain | chunked | {loss:.2f}x the plain |")
  for x in r.get("attention", []):
    if x.get("impl") == "xla" or "ms" not in x:
      continue
    ref = next((y for y in r["attention"] if y.get("impl") == "xla" and y.get("window") == x.get("window")
                and y.get("mode") == x.get("mode") and "ms" in y), None)
    if ref:
      lines.append(f"| attention 8x2048x16x128 causal, window {x.get('window') or 'none'}, "
                   f"{x.get('mode', '').replace('_', '+')} | {ref['ms']:.2f} ms | "
                   f"{x['ms']:.2f} ms ({x.get('impl')}) | {ref['ms'] / x['ms']:.1f}x |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="experiments/results/fastpaths")
  p.add_argument("--iters", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--loss-chunk", type=int, default=1024)
  p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke test)")
  p.add_argument("--only", default="moe,loss,attention,step", help="comma-separated sections")
  a = p.parse_args()
  tk = kernels.tokamax_module()
  report = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "jax": jax.__version__, "python": platform.python_version(),
      "tokamax": getattr(tk, "__version__", None) if tk is not None else None,
      "resolved": {"ragged_dot": kernels.resolve_ragged_dot(),
                   "ragged_dot_weight_grad": kernels.RAGGED_DOT_WEIGHT_GRAD, "row_gather": kernels.ROW_GATHER,
                   "attention_bf16_hd128": kernels.resolve_attention("auto", jnp.bfloat16, 128)},
      "iters": a.iters, "warmup": a.warmup, "quick": a.quick,
      "summary": {}, "moe": [], "loss": [], "attention": [], "step": [],
  }
  print(json.dumps({k: report[k] for k in ("device", "jax", "tokamax", "resolved")}), flush=True)
  sections = {"moe": bench_moe, "loss": bench_loss, "attention": bench_attention, "step": bench_step}
  for name in a.only.split(","):
    t0 = time.perf_counter()
    try:
      sections[name](report, a)
    except Exception as err:
      report.setdefault("section_errors", {})[name] = f"{type(err).__name__}: {err}"[:2000]
      traceback.print_exc()
    print(f"[{name}] {time.perf_counter() - t0:.1f}s", flush=True)
    write(report, a.out)
  print(json.dumps(report["summary"], indent=1))
  for key in ("moe_agreement_rel_err", "loss_agreement_rel_err", "attention_agreement_rel_err"):
    if key in report:
      print(key, json.dumps(report[key]))


if __name__ == "__main__":
  main()
