"""Where the MoE layer's dispatch time goes: variants of the dispatch and expert matmuls (issue 11).

    python experiments/moe_variants.py --out $OUT/moe          # GPU: tokamax, rmoe-paper shape
    python experiments/moe_variants.py --smoke --out /tmp/moe  # CPU: tiny shapes, jax.lax.ragged_dot

The tokamax layer's fwd+bwd (bench_fastpaths' `moe_layer`, grads of x and the three expert weights)
spent ~1.5 of 4.4 ms (H200, run 24) in a transpose and two gathers that move ~210 MB each, ~8x off
bandwidth. tokamax's weight-gradient kernel (`ragged_contracting_dim_dot`, sm90) is called on
`lhs.T`: for the gate/up weights that is x_sorted^T [D, N*k]. The hypothesis: XLA's layout
assignment turns that transpose into a bitcast by giving x_sorted a column-major layout, so the
dispatch gather writes with a stride and a copy back to row-major feeds the forward kernel.
Variants (all the same math: dropless top-k, the routing weight scaling the hidden activation,
float32 sum over the k in the combine):
- base: the library's `expert_mlp` (on NVIDIA GPUs its weight gradients and token-row gathers by
  the Pallas kernels of `pallas_kernels.moe.triton`).
- tiled_wgrad, xla_gather, session11: the library with `kernels.RAGGED_DOT_WEIGHT_GRAD = "tiled"`,
  with `kernels.ROW_GATHER = "xla"`, with both (the library of session 11).
- base_again, tokamax_wgrad(_again): base once more, and with tokamax's own weight-gradient kernel
  (`kernels.RAGGED_DOT_WEIGHT_GRAD = "tokamax"`) twice: two runs of one computation must agree.
- swap: gate/up ragged dot with its own VJP whose weight gradient is ragged_contract(dgu, x_sorted)
  transposed ([E, 2H, D] -> [E, D, 2H], 37 MB): the kernel then transposes dgu, an elementwise
  output, and x_sorted has only row-major consumers.
- pallas_t: gate/up ragged dot with its own VJP that hands the kernel x_sorted^T made by a Pallas
  (Triton) transpose kernel, a custom call XLA cannot propagate a layout through: tests the
  hypothesis directly.
- pgather: the dispatch rows (x_sorted; the cotangent rows in the backward) by the library's
  Pallas (Triton) gather kernel in this variant's otherwise XLA dispatch.
- swap_pgather: swap with pgather's gathers (no transpose of x_sorted anywhere).
- barrier: the gathered rows (x_sorted; the cotangent rows in the backward) behind
  `jax.lax.optimization_barrier`: does that stop the layout reaching the gather?
- take_pib: every row gather a bare `lax.gather(mode=PROMISE_IN_BOUNDS)` (jax's x[idx] already is
  one, after a negative-index select) with `unique_indices` where the indices are a permutation.
- split: gate and up as two ragged dots (no weight concatenate, no product slicing).
- swap_split, swap_pib: swap with split's or take_pib's change.
Per variant (in this order, skipped once --budget-s would be passed): compile time, fwd and fwd+bwd
median ms (two interleaved rounds), relative error of the output and the four gradients against
base, the optimised fwd+bwd HLO in hlo_moe_<variant>.txt (kernel modules cut out of custom calls).
Then a table, and for base and the fastest a per-kernel profile (jax.profiler, profile_ops' reader)
and a summary of their big entry ops: transposes, copies, gathers and custom calls with the ops
inside, output layout ('!': not row-major), operands and consumers. Writes moe_variants.json.
"x xla" uses --with-xla's timing, else bench_fastpaths' stored XLA layer time on the same device.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import tempfile
import time
import traceback

T_START = time.perf_counter()   # the budget counts the imports (jax, tokamax) too
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from efficient_lm import kernels  # noqa: E402
from efficient_lm.layers import moe as moe_lib  # noqa: E402
from experiments import bench_fastpaths as bf  # noqa: E402
from pallas_kernels import _compat  # noqa: E402
from pallas_kernels.moe import triton as moe_triton  # noqa: E402

VARIANTS = {   # name: (options, what it tests); options None = the library's expert_mlp
    "base": (None, "library expert_mlp (GPU: Pallas weight gradients and row gathers)"),
    "base_again": (None, "library expert_mlp, compiled and run again: is it deterministic?"),
    "tiled_wgrad": (dict(library={"RAGGED_DOT_WEIGHT_GRAD": "tiled"}),
                    "library expert_mlp, weight gradients by group-padded tiles (XLA)"),
    "xla_gather": (dict(library={"ROW_GATHER": "xla"}), "library expert_mlp, XLA's row gathers"),
    "session11": (dict(library={"RAGGED_DOT_WEIGHT_GRAD": "tiled", "ROW_GATHER": "xla"}),
                  "library expert_mlp as of session 11: tiled weight gradients, XLA's row gathers"),
    "tokamax_wgrad": (dict(library={"RAGGED_DOT_WEIGHT_GRAD": "tokamax"}),
                      "library expert_mlp with tokamax's own weight gradient"),
    "tokamax_wgrad_again": (dict(library={"RAGGED_DOT_WEIGHT_GRAD": "tokamax"}), "the same, compiled and run again"),
    "swap": (dict(wgrad="swap"), "dW_gu = rcd(dgu, x_sorted)^T: transpose dgu, not x_sorted"),
    "pallas_t": (dict(wgrad="pallas_t"), "x_sorted^T by a Pallas transpose (layout barrier)"),
    "pgather": (dict(take="pallas"), "dispatch rows by a Pallas gather (row-major, a custom call)"),
    "swap_pgather": (dict(wgrad="swap", take="pallas"), "swap with pgather's gathers"),
    "barrier": (dict(barrier=True), "optimization_barrier on the gathered rows"),
    "take_pib": (dict(take="pib"), "lax.gather PROMISE_IN_BOUNDS, unique_indices"),
    "split": (dict(gate_up="split"), "gate and up as two ragged dots"),
    "swap_split": (dict(wgrad="swap", gate_up="split"), "swap, gate and up split"),
    "swap_pib": (dict(wgrad="swap", take="pib"), "swap with take_pib's gathers"),
}


# ----------------------------------------------------------------------------- row gathers

def _take_index(x_PD, idx_P, unique):
  """The library's gather: numpy indexing (a negative-index select, then PROMISE_IN_BOUNDS)."""
  del unique
  return x_PD[idx_P]


def _take_pib(x_PD, idx_P, unique):
  """Rows of x by a bare gather: no negative-index select, unique_indices for permutations."""
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0,))
  return jax.lax.gather(x_PD, idx_P[:, None], dnums, slice_sizes=(1, x_PD.shape[1]), unique_indices=unique,
                        indices_are_sorted=False, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def make_dispatch(take, barrier, take_rows=None):
  """(gather_pairs, combine_pairs, permute_rows): the library's custom-VJP permutations, rows taken
  by `take(x, idx, unique)`, the [N*k, D] token rows (x_sorted; the cotangent rows in the backward)
  by `take_rows(x, idx)` where given; barrier: those rows behind an optimization barrier."""
  def rows(x_ND, order_P, k):
    x_PD = take_rows(x_ND, order_P // k) if take_rows else take(x_ND, order_P // k, False)
    return jax.lax.optimization_barrier(x_PD) if barrier else x_PD

  def sum_pairs(y_PD, slot_P, k):
    return jnp.sum(take(y_PD, slot_P, True).reshape(-1, k, y_PD.shape[-1]).astype(jnp.float32),
                   axis=1).astype(y_PD.dtype)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def gather_pairs(x_ND, order_P, slot_P, k):
    return rows(x_ND, order_P, k)

  gather_pairs.defvjp(lambda x, o, s, k: (rows(x, o, k), (o, s)),
                      lambda k, res, g: (sum_pairs(g, res[1], k), None, None))

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
  def combine_pairs(y_PD, order_P, slot_P, k):
    return sum_pairs(y_PD, slot_P, k)

  combine_pairs.defvjp(lambda y, o, s, k: (sum_pairs(y, s, k), (o, s)),
                       lambda k, res, g: (rows(g, res[0], k), None, None))

  @jax.custom_vjp
  def permute_rows(x_PD, perm_P, inverse_P):
    return take(x_PD, perm_P, True)

  permute_rows.defvjp(lambda x, p, i: (take(x, p, True), (p, i)),
                      lambda res, g: (take(g, res[1], True), None, None))
  return gather_pairs, combine_pairs, permute_rows


# ----------------------------------------------------------------------------- ragged dots

_warned = set()


def _warn(msg):
  if msg not in _warned:
    _warned.add(msg)
    print(f"WARNING: {msg}", flush=True)


def _contracting_dims():
  """tokamax's own RAGGED_CONTRACTING_DOT_DIM_NUMS where importable: its Mosaic GPU path picks the
  kernel by == on these (lists, not tuples)."""
  try:
    from tokamax._src.ops.ragged_dot import base as tk_base  # noqa: PLC0415
    return tk_base.RAGGED_CONTRACTING_DOT_DIM_NUMS
  except Exception:
    return jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def ragged_contract(lhs_PM, rhs_PN, sizes_G, impl, dtype):
  """[G, M, N]: per group g, lhs[rows of g]^T @ rhs[rows of g] (tokamax's weight-gradient kernel,
  which transposes lhs itself, or jax.lax.ragged_dot_general)."""
  dims = _contracting_dims()
  if impl == "tokamax":
    tk = kernels.tokamax_module()
    try:   # Mosaic first, as kernels.ragged_dot's default chain would; say so if it refuses
      return tk.ragged_dot_general(lhs_PM, rhs_PN, sizes_G, ragged_dot_dimension_numbers=dims,
                                   preferred_element_type=dtype, implementation="mosaic")
    except Exception as e:
      _warn(f"tokamax mosaic ragged_contract failed ({type(e).__name__}: {str(e)[:200]}); default chain")
      return tk.ragged_dot_general(lhs_PM, rhs_PN, sizes_G, ragged_dot_dimension_numbers=dims,
                                   preferred_element_type=dtype)
  return jax.lax.ragged_dot_general(lhs_PM, rhs_PN, sizes_G, dims, preferred_element_type=dtype)


def _transpose_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...].T


def pallas_transpose(x_MK):
  """x.T by a Pallas kernel ([bm, bk] tiles): a custom call, so XLA keeps x row-major for it."""
  m, kd = x_MK.shape
  block = lambda n: next((b for b in (128, 64, 32, 16) if n % b == 0), None)
  bm, bk = block(m), block(kd)
  interpret = jax.default_backend() != "gpu"
  if bm is None or bk is None or (not interpret and not _compat.has_triton_backend()):
    _warn(f"pallas_transpose: {x_MK.shape} not tileable or no Triton backend; XLA transpose")
    return x_MK.T
  return pl.pallas_call(
      _transpose_kernel, grid=(m // bm, kd // bk),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j: (i, j))],
      out_specs=pl.BlockSpec((bk, bm), lambda i, j: (j, i)),
      out_shape=jax.ShapeDtypeStruct((kd, m), x_MK.dtype),
      compiler_params=None if interpret else _compat.triton_params(4, 1), interpret=interpret)(x_MK)


def pallas_gather(x_ND, idx_P):
  """x[idx] by the library's Pallas row gather (interpreted off the GPU), XLA's where it does not tile."""
  if not moe_triton.gather_rows_supported(idx_P.shape[0], x_ND.shape[1]) or not _compat.has_triton_backend():
    _warn(f"pallas_gather: {x_ND.shape}[{idx_P.shape[0]}] not tileable or no Triton backend; XLA gather")
    return x_ND[idx_P]
  return moe_triton.gather_rows(x_ND, idx_P, interpret=jax.default_backend() != "gpu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def ragged_dot_wgrad(x_MK, w_GKN, sizes_G, impl, how):
  """kernels.ragged_dot with a VJP whose weight gradient avoids XLA's transpose of x:
  how="swap": rcd(g, x) [G, N, K] transposed (the kernel transposes g instead of x);
  how="pallas_t": rcd(x, g) with x^T from `pallas_transpose`."""
  return kernels.ragged_dot(x_MK, w_GKN, sizes_G, impl=impl)


def _rdw_fwd(x_MK, w_GKN, sizes_G, impl, how):
  return kernels.ragged_dot(x_MK, w_GKN, sizes_G, impl=impl), (x_MK, w_GKN, sizes_G)


def _rdw_bwd(impl, how, res, g_MN):
  x_MK, w_GKN, sizes_G = res
  # dx as tokamax's own VJP does it (TRANS_RHS is w.mT then the plain kernel); w is small.
  dx = kernels.ragged_dot(g_MN, jnp.swapaxes(w_GKN, 1, 2), sizes_G, impl=impl).astype(x_MK.dtype)
  if how == "swap":
    dw = jnp.swapaxes(ragged_contract(g_MN, x_MK, sizes_G, impl, w_GKN.dtype), 1, 2)
  else:
    # The kernel's own lhs.T meets this .T: XLA folds the pair, the kernel reads the Pallas output.
    dw = ragged_contract(pallas_transpose(x_MK).T, g_MN, sizes_G, impl, w_GKN.dtype)
  return dx, dw, None


ragged_dot_wgrad.defvjp(_rdw_fwd, _rdw_bwd)


# ----------------------------------------------------------------------------- variants

def make_expert_mlp(take="index", barrier=False, gate_up="fused", wgrad="library"):
  """An `expert_mlp` (same signature and math as the library's) with the given pieces swapped."""
  gather_pairs, combine_pairs, permute_rows = make_dispatch(
      _take_pib if take == "pib" else _take_index, barrier, pallas_gather if take == "pallas" else None)

  def expert_mlp(x_ND, expert_idx_NK, weights_NK, w_gate_EDH, w_up_EDH, w_down_EHD, *, impl="auto"):
    impl = kernels.resolve_ragged_dot(impl)
    n, k = expert_idx_NK.shape
    n_experts, hid = w_gate_EDH.shape[0], w_gate_EDH.shape[-1]
    flat_expert = expert_idx_NK.reshape(-1)
    order = jnp.argsort(flat_expert, stable=True)
    slot = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))
    x_sorted = gather_pairs(x_ND, order, slot, k)
    w_sorted = permute_rows(weights_NK.reshape(-1, 1), order, slot)
    sizes = jnp.bincount(flat_expert, length=n_experts).astype(jnp.int32)
    if wgrad == "library":
      rd = lambda a, w: kernels.ragged_dot(a, w, sizes, impl=impl)
    else:
      rd = lambda a, w: ragged_dot_wgrad(a, w, sizes, impl, wgrad)
    if gate_up == "fused":
      gu = rd(x_sorted, jnp.concatenate([w_gate_EDH, w_up_EDH], axis=-1))
      gate, up = gu[:, :hid], gu[:, hid:]
    else:
      gate, up = rd(x_sorted, w_gate_EDH), rd(x_sorted, w_up_EDH)
    h = (jax.nn.silu(gate) * up * w_sorted).astype(x_ND.dtype)
    y_sorted = kernels.ragged_dot(h, w_down_EHD, sizes, impl=impl)
    return combine_pairs(y_sorted, order, slot, k)

  return expert_mlp


def f32_reference(w_router, k, x, ws, cot):
  """The layer's output and gradients in float32 through jax.lax.ragged_dot at full matmul
  precision: what every variant is measured against (a variant agreeing with base alone could
  share base's error)."""
  up = lambda a: a.astype(jnp.float32)
  f = bf.moe_layer(w_router, k, "xla")
  with jax.default_matmul_precision("highest"):
    x32, ws32, cot32 = up(x), tuple(up(w) for w in ws), up(cot)
    out = jax.jit(lambda x, ws: f(x, *ws))(x32, ws32)
    grads = jax.jit(lambda x, ws, cot: jax.vjp(f, x, *ws)[1](cot))(x32, ws32, cot32)
  return (jax.device_get(out),) + tuple(jax.device_get(grads))


@contextlib.contextmanager
def library_settings(settings):
  """The `efficient_lm.kernels` module settings (RAGGED_DOT_WEIGHT_GRAD, ROW_GATHER) while a
  variant is traced."""
  saved = {name: getattr(kernels, name) for name in settings}
  for name, value in settings.items():
    setattr(kernels, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(kernels, name, value)


@contextlib.contextmanager
def layer_with(expert_fn):
  """bench_fastpaths.moe_layer looks `expert_mlp` up in its module when traced: swapping it there
  runs a variant through bench_fastpaths' exact router and layer."""
  saved = bf.expert_mlp
  bf.expert_mlp = expert_fn
  try:
    yield
  finally:
    bf.expert_mlp = saved


# ----------------------------------------------------------------------------- HLO summary

_SHAPE = re.compile(r"(\w+)\[([\d,]*)\](?:\{([\d,]*)[^}]*\})?")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


def _shapes(text):
  """[(dtype, dims, minor_to_major or None)] of every array shape in text."""
  out = []
  for dt, dims, layout in _SHAPE.findall(text):
    dims = tuple(int(d) for d in dims.split(",") if d)
    out.append((dt, dims, tuple(int(d) for d in layout.split(",") if d) if layout else None))
  return out


def _nbytes(shapes):
  return sum(_BYTES.get(dt, 4) * int(np.prod(dims)) for dt, dims, _ in shapes)


def _fmt(shape):
  dt, dims, layout = shape
  s = f"{dt}[{','.join(map(str, dims))}]"
  if layout is not None and len(dims) > 1:
    s += "{" + ",".join(map(str, layout)) + "}" + ("" if layout == tuple(range(len(dims)))[::-1] else "!")
  return s


def parse_hlo(text):
  """{computation: [instr]}, entry name; instr: name, shape text, opcode, operand names, attrs."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      cur = head.group(2)
      comps[cur] = []
      if head.group(1):
        entry = cur
      continue
    if line.startswith("}"):
      cur = None
      continue
    m = re.match(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
    if cur is None or not m:
      continue
    name, rest = m.groups()
    if rest.startswith("("):   # tuple shape: up to the matching parenthesis
      depth = 0
      for i, c in enumerate(rest):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
          break
      shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
      shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\((.*)", rest)
    if not op:
      continue
    opcode, args = op.groups()
    depth, end = 1, len(args)
    for i, c in enumerate(args):
      depth += (c == "(") - (c == ")")
      if depth == 0:
        end = i
        break
    comps[cur].append({"name": name, "shape": shape, "opcode": opcode,
                       "operands": re.findall(r"%([\w.\-]+)", args[:end]), "attrs": args[end + 1:]})
  return comps, entry


def _label(ins):
  """A consumer's short label: opcode and name, or for a custom call its kernel (Mosaic GPU: the
  function name in its module; Triton: the name in its config) or target."""
  if ins["opcode"] != "custom-call":
    return f"{ins['opcode']}:{ins['name']}"
  target = re.search(r'custom_call_target="([^"]+)"', ins["attrs"])
  kname = (re.search(r"([A-Za-z_]\w*?)_mosaic_gpu(?:_kernel)?\b", ins["attrs"])
           or re.search(r'(?:kernel_name|name)\\?"\s*:\s*\\?"([\w.\-]+)', ins["attrs"]))
  name = re.sub(r"^x[0-9a-fA-F]{2}", "", kname.group(1)) if kname else None   # an escaped byte before it
  return "cc:" + (name or (target.group(1) if target else ins["name"]))


def hlo_summary(text, min_bytes):
  """The entry computation's fusions, copies, transposes and gathers whose output is >= min_bytes:
  ops inside, output shape and layout ('!' marks a non-row-major layout), operands, consumers."""
  comps, entry = parse_hlo(text)
  if entry is None:
    return []
  instrs = comps[entry]
  by_name = {i["name"]: i for i in instrs}
  users = {}
  for i in instrs:
    for o in i["operands"]:
      users.setdefault(o, []).append(i)

  def consumers(name, depth=0):   # look through bitcasts, tuples, barriers; "#i": operand i
    out = []
    for u in users.get(name, []):
      if u["opcode"] in ("bitcast", "tuple", "get-tuple-element", "opt-barrier") and depth < 3:
        out += consumers(u["name"], depth + 1) or [u["opcode"]]
      else:
        out += [f"{_label(u)}#{i}" for i, o in enumerate(u["operands"]) if o == name]
    return out

  def inner_ops(ins):
    called = re.search(r"calls=%?([\w.\-]+)", ins["attrs"])
    if not called or called.group(1) not in comps:
      return [], []
    ops, transposes = [], []
    for j in comps[called.group(1)]:
      if j["opcode"] not in ("parameter", "constant", "bitcast", "broadcast", "tuple", "get-tuple-element"):
        ops.append(j["opcode"])
      if j["opcode"] in ("transpose", "copy"):
        transposes.append(f"{j['opcode']} {'/'.join(_fmt(s) for s in _shapes(j['shape']))}")
    return sorted(set(ops)), transposes

  rows = []
  for ins in instrs:
    if ins["opcode"] not in ("fusion", "copy", "transpose", "gather", "scatter", "custom-call"):
      continue
    out_shapes = _shapes(ins["shape"])
    if _nbytes(out_shapes) < min_bytes:
      continue
    ops, transposes = inner_ops(ins)
    kind = re.search(r"kind=(\w+)", ins["attrs"])
    op_name = re.search(r'op_name="([^"]+)"', ins["attrs"])
    operand_shapes = [s for o in ins["operands"] if o in by_name for s in _shapes(by_name[o]["shape"])[:1]]
    rows.append({
        "name": ins["name"], "opcode": ins["opcode"] if ins["opcode"] != "custom-call" else _label(ins),
        "kind": kind.group(1) if kind else "", "ops": ops, "transposes": transposes,
        "out": [_fmt(s) for s in out_shapes], "in": [_fmt(s) for s in operand_shapes],
        "bytes": _nbytes(out_shapes) + _nbytes(operand_shapes),
        "feeds": sorted(set(consumers(ins["name"]))), "op_name": op_name.group(1) if op_name else ""})
  return rows


def shorten_hlo(text, limit=400):
  """The HLO with every quoted string over `limit` characters cut (Mosaic GPU and Triton custom
  calls carry their whole kernel module in backend_config: megabytes per call)."""
  cut = lambda m: m.group(0)[:limit // 2] + f'...<{len(m.group(0))} chars>"'
  return "\n".join(re.sub(r'"(?:[^"\\]|\\.){%d,}"' % limit, cut, line) if len(line) > limit else line
                   for line in text.splitlines())


def _notable(r):
  """Transposes, copies, gathers, non-row-major outputs and custom calls (the ragged-dot kernels)."""
  return (r["transposes"] or "gather" in r["ops"] or r["opcode"] in ("copy", "transpose", "gather")
          or r["opcode"].startswith("cc:") or any(o.endswith("!") for o in r["out"]))


def print_summary(title, rows):
  shown = [r for r in rows if _notable(r)]
  print(f"\n== HLO {title}: {len(shown)} of {len(rows)} big entry ops (transposes, copies, gathers, "
        "custom calls; '!' = non-row-major layout; MB = output + operands; ms = profiled; '#i' = operand i)")
  for r in shown:
    flag = "  <-- transpose/copy" if r["transposes"] or r["opcode"] in ("copy", "transpose") else ""
    ms = f"{r['ms']:6.3f} ms" if "ms" in r else ""
    print(f"  {r['name']:<32} {r['opcode'][:34]:<12} {r['kind']:<7} {r['bytes'] / 1e6:6.0f} MB {ms:>9}  "
          f"out {' '.join(r['out'])}  in {' '.join(r['in'][:3])}{flag}")
    detail = ",".join(r["ops"]) + (f"; {'; '.join(r['transposes'])}" if r["transposes"] else "")
    if detail:
      print(f"  {'':<32} ops: {detail[:200]}")
    print(f"  {'':<32} feeds: {', '.join(r['feeds'][:4]) or '(output)'}"
          + (f"   [{r['op_name'][:70]}]" if r["op_name"] else ""))


def profile_kernels(fn, iters):
  """{kernel: ms per call} on the busiest device stream (a CPU: host XLA thread) from a
  jax.profiler trace of `iters` calls, read by profile_ops. GPU kernel names are the HLO's fusion
  names (and the Mosaic kernels' own), so they join the HLO summary by name."""
  from experiments import profile_ops as po  # noqa: PLC0415
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for _ in range(iters):
        jax.block_until_ready(fn())
    totals = po.kernel_totals(po.read_trace(log_dir))
  # One track only: a device's streams and XLA's derived op lines would count each kernel twice.
  tracks = {t: v for t, v in totals.items() if "Stream" in t} or totals
  track = max(tracks, key=lambda t: sum(us for us, _ in tracks[t].values()))
  return track, {k: us / iters / 1e3 for k, (us, _) in tracks[track].items()}


def print_profile(title, track, kernels_ms, hlo, top):
  from experiments import profile_ops as po  # noqa: PLC0415
  sources = po.hlo_sources(hlo)
  print(f"\n== profile {title} | {track}: {sum(kernels_ms.values()):.3f} ms per call in {len(kernels_ms)} kernels")
  for kname, ms in sorted(kernels_ms.items(), key=lambda kv: -kv[1])[:top]:
    print(f"  {ms:8.3f} ms  {kname[:48]:<48} {sources.get(kname, '')[-80:]}")


# ----------------------------------------------------------------------------- main

def write(report, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "moe_variants.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)


def stored_xla_ms(device):
  """bench_fastpaths' XLA (jax.lax.ragged_dot) layer fwd+bwd ms, where it was measured on this device kind."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fastpaths", "fastpaths.json")
  try:
    with open(path) as f:
      stored = json.load(f)
    if stored.get("device") != device:
      return None
    return next(r["ms"] for r in stored["moe"] if r.get("what") == "moe_layer" and r.get("impl") == "xla"
                and r.get("mode") == "fwd_bwd" and "ms" in r)
  except Exception:
    return None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="experiments/results/moe_variants")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--impl", default="tokamax", choices=("tokamax", "xla"))
  p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, base always first")
  p.add_argument("--budget-s", type=float, default=130.0, help="skip what would start after this")
  p.add_argument("--with-xla", action="store_true",
                 help="also time the jax.lax.ragged_dot layer (else: bench_fastpaths' stored number, same device)")
  p.add_argument("--no-profile", action="store_true", help="skip the kernel profile of base and the fastest")
  p.add_argument("--profile-iters", type=int, default=10)
  p.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, impl xla, bf16 and float32")
  a = p.parse_args(argv)
  t_start = T_START
  impl = "xla" if a.smoke else a.impl
  if impl == "tokamax" and kernels.tokamax_module() is None:
    print("WARNING: tokamax not importable (or unsuited to this jax): falling back to impl=xla", flush=True)
    impl = "xla"
  names = ["base"] + [v for v in a.variants.split(",") if v in VARIANTS and v != "base"]
  tk = kernels.tokamax_module()
  report = {"meta": {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                     "jax": jax.__version__, "tokamax": getattr(tk, "__version__", None), "impl": impl,
                     "iters": a.iters, "warmup": a.warmup, "smoke": a.smoke,
                     "timed": "jit(vjp(moe_layer)(cot)): grads of x, w_gate, w_up, w_down (as bench_fastpaths)"},
            "rows": [], "hlo_summary": {}}
  print(json.dumps(report["meta"]), flush=True)
  failures, bf16_results, bf16_args = [], {}, None
  for dtype in ((jnp.bfloat16, jnp.float32) if a.smoke else (jnp.bfloat16,)):
    x, w_router, ws, cot, k = bf.moe_problem(a.smoke, np.random.default_rng(0))
    x, cot, ws = x.astype(dtype), cot.astype(dtype), tuple(w.astype(dtype) for w in ws)
    n, d = x.shape
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    dname = jnp.dtype(dtype).name
    print(f"\n== {dname}: {n} tokens, top-{k} of {ws[0].shape[0]}, d {d}, hidden {ws[0].shape[2]}, impl {impl}",
          flush=True)
    results, ref = {}, None
    ref32 = f32_reference(w_router, k, x, ws, cot)
    for name in names:
      opts, what = VARIANTS[name]
      row = {"variant": name, "dtype": dname, "what": what}
      elapsed = time.perf_counter() - t_start
      last = max((r.get("compile_s", 0) for r in report["rows"]), default=0) + 3
      if not a.smoke and elapsed + last > a.budget_s:
        row["error"] = f"skipped: {elapsed:.0f} s elapsed, budget {a.budget_s:.0f} s"
        report["rows"].append(row)
        print(f"  {name}: {row['error']}", flush=True)
        continue
      try:
        library = opts is None or "library" in opts
        fn = moe_lib.expert_mlp if library else make_expert_mlp(**opts)
        with layer_with(fn), library_settings((opts or {}).get("library", {})):
          f = bf.moe_layer(w_router, k, impl)
          t0 = time.perf_counter()
          fwd_bwd = jax.jit(lambda x, ws, cot: jax.vjp(f, x, *ws)[1](cot)).lower(x, ws, cot).compile()
          fwd = jax.jit(lambda x, ws: f(x, *ws)).lower(x, ws).compile()
          row["compile_s"] = time.perf_counter() - t0
        out = (jax.device_get(fwd(x, ws)),) + tuple(jax.device_get(fwd_bwd(x, ws, cot)))
        if ref is None:
          ref = out
        names5 = ("out", "dx", "dw_gate", "dw_up", "dw_down")
        row["rel_err_vs_base"] = {nm: bf.rel_err(o, r) for nm, o, r in zip(names5, out, ref)}
        errs = {nm: bf.rel_err(o, r) for nm, o, r in zip(names5, out, ref32)}
        row["rel_err"], row["max_rel_err"] = errs, max(errs.values())
        if not all(np.all(np.isfinite(np.asarray(o, np.float32))) for o in out):
          row["max_rel_err"] = float("nan")
        row["fwd_ms"] = bf.median_ms(lambda: fwd(x, ws), a.iters, a.warmup)
        row["fwd_bwd_ms"] = bf.median_ms(lambda: fwd_bwd(x, ws, cot), a.iters, a.warmup)
        hlo = fwd_bwd.as_text()
        results[name] = (fwd_bwd, hlo)
        if not row["max_rel_err"] <= tol:
          failures.append(f"{dname} {name}: max rel err {row['max_rel_err']:.2e} > {tol:.0e}")
        if dtype == jnp.bfloat16:
          try:   # a parser problem must not cost the timings
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, f"hlo_moe_{name}.txt"), "w") as fh:
              fh.write(shorten_hlo(hlo))
            # Threshold: half of x [N, D]; catches [N*k, *] rows and the gate/up weights.
            report["hlo_summary"][name] = hlo_summary(hlo, x.size * x.dtype.itemsize // 2)
          except Exception as err:
            print(f"  {name}: HLO dump/summary failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            if a.smoke:
              failures.append(f"{dname} {name}: HLO summary: {err}")
      except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
        traceback.print_exc()
        failures.append(f"{dname} {name}: {row['error'][:200]}")
      report["rows"].append(row)
      get = lambda key: row.get(key, float("nan"))
      print(f"  {name:<12} fwd+bwd {get('fwd_bwd_ms'):8.3f} ms  fwd {get('fwd_ms'):7.3f}  compile "
            f"{get('compile_s'):5.1f} s  max rel err {get('max_rel_err'):.1e}"
            + (f"  ERROR {row['error'][:150]}" if "error" in row else ""), flush=True)
      write(report, a.out)
    if dtype == jnp.bfloat16:
      bf16_results, bf16_args = results, (x, ws, cot)
    # Second timing round, interleaved, so drift between variants shows.
    for name, (fn, _) in results.items():
      row = next(r for r in report["rows"] if r["variant"] == name and r["dtype"] == dname)
      row["fwd_bwd_ms_round2"] = bf.median_ms(lambda: fn(x, ws, cot), a.iters, 1)
    if dtype == jnp.bfloat16 and a.with_xla and impl != "xla" \
        and time.perf_counter() - t_start < a.budget_s - 15:
      row = {"variant": "xla_layer", "dtype": dname, "what": "library expert_mlp, jax.lax.ragged_dot"}
      try:
        f = bf.moe_layer(w_router, k, "xla")
        fn = jax.jit(lambda x, ws, cot: jax.vjp(f, x, *ws)[1](cot)).lower(x, ws, cot).compile()
        row["fwd_bwd_ms"] = bf.median_ms(lambda: fn(x, ws, cot), max(3, a.iters // 4), 1)
      except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
      report["rows"].append(row)
    write(report, a.out)

  # Final table, HLO summaries of base and the fastest variant.
  print("\n== variant       dtype     fwd+bwd ms  (round 2)  fwd ms   x base   x xla   max rel err   what")
  for dname in dict.fromkeys(r["dtype"] for r in report["rows"]):
    rows = [r for r in report["rows"] if r["dtype"] == dname]
    base = next((r.get("fwd_bwd_ms") for r in rows if r["variant"] == "base"), None)
    xla = next((r.get("fwd_bwd_ms") for r in rows if r["variant"] == "xla_layer"), None) \
        or (stored_xla_ms(report["meta"]["device"]) if dname == "bfloat16" and not a.smoke else None)
    for r in rows:
      ms = r.get("fwd_bwd_ms")
      if ms and base:
        r["speedup_vs_base"] = base / ms
      if ms and xla:
        r["speedup_vs_xla"] = xla / ms
      nan = float("nan")
      print(f"   {r['variant']:<12} {dname:<9} {ms or nan:9.3f}  ({r.get('fwd_bwd_ms_round2', nan):8.3f})"
            f"  {r.get('fwd_ms', nan):7.3f}  {r.get('speedup_vs_base', nan):6.2f}  {r.get('speedup_vs_xla', nan):6.2f}"
            f"   {r.get('max_rel_err', nan):9.1e}   {r['what']}" + (f"  {r['error'][:40]}" if "error" in r else ""))
  timed = [r for r in report["rows"] if r["dtype"] == "bfloat16" and "fwd_bwd_ms" in r and r["variant"] in VARIANTS]
  if timed:
    fastest = min(timed, key=lambda r: r["fwd_bwd_ms"])["variant"]
    report["fastest"] = fastest
    for name in dict.fromkeys(("base", fastest)):
      if name not in report["hlo_summary"]:
        continue
      if not a.no_profile and name in bf16_results and time.perf_counter() - t_start < a.budget_s:
        try:
          fn, hlo = bf16_results[name]
          track, kms = profile_kernels(lambda: fn(*bf16_args), a.profile_iters)
          report.setdefault("profile", {})[name] = {"track": track, "kernels_ms": kms}
          for r in report["hlo_summary"][name]:
            if r["name"] in kms:
              r["ms"] = kms[r["name"]]
          print_profile(name, track, kms, hlo, 15)
        except Exception as err:
          print(f"profile {name} failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
      print_summary(f"{name} (hlo_moe_{name}.txt)", report["hlo_summary"][name])
  report["failures"] = failures
  report["wall_s"] = time.perf_counter() - t_start
  write(report, a.out)
  print(f"\n{len(failures)} failures{': ' + '; '.join(failures) if failures else ''}; wall {report['wall_s']:.0f} s; "
        f"wrote {os.path.join(a.out, 'moe_variants.json')}", flush=True)
  return 1 if failures and a.smoke else 0


if __name__ == "__main__":
  sys.exit(main())
