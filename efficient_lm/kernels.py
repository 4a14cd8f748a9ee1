"""The one place where library kernels are chosen: grouped matmuls, attention, the LM loss.

- `ragged_dot`: tokamax's `ragged_dot` where its Mosaic kernels run (Hopper-or-newer NVIDIA
  GPUs, TPUs) and tokamax imports; `jax.lax.ragged_dot` everywhere else. On NVIDIA GPUs the
  weight gradient of the tokamax path is our own (a Pallas kernel, or dense matmuls over
  group-padded tiles), not tokamax's: see RAGGED_DOT_WEIGHT_GRAD.
- `gather_rows`: the MoE dispatch's row gathers, a Pallas kernel on NVIDIA GPUs (ROW_GATHER).
- `dot_product_attention`: cuDNN flash attention through `jax.nn.dot_product_attention(...,
  implementation="cudnn")` on NVIDIA GPUs (bf16/fp16, head_dim <= 128 and a multiple of 8);
  tokamax's attention on TPU; XLA elsewhere. The window is `(w, 0)` with `is_causal=True` on
  every path: query t sees keys s with 0 <= t - s <= w.
- `chunked_token_stats`: the LM loss without the float32 [tokens, vocab] logits: chunks of
  tokens, logits recomputed per chunk in a custom backward.

The choice is made at trace time. `impl="auto"` reads, in order, a `use(...)` context, the
environment (`EFFICIENT_LM_RAGGED_DOT`, `EFFICIENT_LM_ATTENTION`), then the platform.
tokamax is imported lazily; when it is absent, or a tokamax call fails while tracing, the
XLA path runs (with one warning).
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import jax
import jax.numpy as jnp

RAGGED_DOT_IMPLS = ("auto", "xla", "tokamax")
# The weight gradient of the tokamax ragged dot on NVIDIA GPUs. tokamax 0.0.17's Hopper kernel for
# it (`ragged_contracting_dim_dot_sm90`) gave weight gradients that differed by 2-12% between two
# runs of the same computation on an H100 (experiments/NOTES.md, session 11, run 27), and by
# 1.4-7.6% from jax.lax.ragged_dot (session 2), while the forward and the input gradient agreed
# exactly; in Mosaic GPU interpret mode on the CPU the same kernel is exact, so it is a GPU-only
# race (unconfirmed guess: the masked operand it feeds wgmma from registers while the previous
# wgmma is still in flight). "pallas" (default): `pallas_kernels.moe.triton.grouped_weight_grad`,
# a Triton-backend kernel walking each group's rows; where that backend or the shape does not
# serve, "tiled": `grouped_weight_grad`, dense matmuls over group-padded tiles; "tokamax":
# tokamax's own, for when that is fixed.
RAGGED_DOT_WEIGHT_GRADS = ("pallas", "tiled", "tokamax")
RAGGED_DOT_WEIGHT_GRAD = "pallas"
# The MoE dispatch's row gathers (`gather_rows`) on NVIDIA GPUs: "pallas" a Triton-backend kernel
# (row-major output: XLA had given its own gather a column-major layout that cost ~0.8 ms of the
# rmoe-paper layer's 5.1, run 27), "xla" x[idx].
ROW_GATHERS = ("pallas", "xla")
ROW_GATHER = "pallas"
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "tokamax")

_overrides: dict[str, str] = {}
_warned: set[str] = set()


@contextlib.contextmanager
def use(*, ragged_dot: str | None = None, attention: str | None = None):
  """Forces the kernels chosen while tracing inside the context (benchmarks, tests)."""
  new = {"ragged_dot": ragged_dot, "attention": attention}
  _check("ragged_dot", ragged_dot, RAGGED_DOT_IMPLS)
  _check("attention", attention, ATTENTION_IMPLS)
  saved = dict(_overrides)
  _overrides.update({k: v for k, v in new.items() if v is not None})
  try:
    yield
  finally:
    _overrides.clear()
    _overrides.update(saved)


def _check(name, impl, allowed):
  if impl is not None and impl not in allowed:
    raise ValueError(f"{name}: expected one of {allowed}, got {impl!r}")


def _requested(name: str, impl: str, allowed) -> str:
  _check(name, impl, allowed)
  if impl == "auto":
    impl = _overrides.get(name) or os.environ.get(f"EFFICIENT_LM_{name.upper()}", "auto")
    _check(f"EFFICIENT_LM_{name.upper()}", impl, allowed)
  return impl


def _warn_once(key: str, msg: str):
  if key not in _warned:
    _warned.add(key)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


@functools.cache
def tokamax_module():
  """The tokamax module if it imports and suits this jax, else None.

  tokamax 0.0.12 (the last for Python 3.11) imports on jax 0.11+ but its kernels fail there
  (`Mesh.__init__() got an unexpected keyword argument 'out_shape'`), so it is refused."""
  try:
    import tokamax  # noqa: PLC0415  (lazy: an optional dependency)
  except Exception:  # ImportError, or a broken install (tokamax 0.0.17 without xprof)
    return None
  tk_version = tuple(getattr(tokamax, "__version_info__", (0, 0, 0)))[:3]
  if jax.__version_info__[:2] >= (0, 11) and tk_version < (0, 0, 17):
    return None
  if tk_version < (0, 0, 17):
    # tokamax < 0.0.17 parses the host program's whole sys.argv with absl at its first call,
    # which fails on any flag it does not know (pytest's, our CLI's); keep absl's defaults.
    try:
      from absl import flags  # noqa: PLC0415
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    except Exception:
      pass
  return tokamax


def _platform() -> tuple[str, str, int]:
  """(backend, device kind, compute-capability major or 0)."""
  backend = jax.default_backend()
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", "") or ""
  try:
    major = int(str(getattr(dev, "compute_capability", "0")).split(".")[0])
  except ValueError:
    major = 0
  return backend, kind, major


def _is_nvidia(backend: str, kind: str) -> bool:
  return backend in ("gpu", "cuda") and "NVIDIA" in kind.upper()


# ----------------------------------------------------------------------------- ragged_dot

def resolve_ragged_dot(impl: str = "auto") -> str:
  """-> "tokamax" or "xla" (jax.lax.ragged_dot)."""
  impl = _requested("ragged_dot", impl, RAGGED_DOT_IMPLS)
  if impl == "tokamax":
    if tokamax_module() is None:
      raise ValueError("ragged_dot: impl='tokamax' needs tokamax installed (>= 0.0.17 on jax >= 0.11)")
    return "tokamax"
  if impl == "xla":
    return "xla"
  backend, kind, major = _platform()
  mosaic_runs = backend == "tpu" or (_is_nvidia(backend, kind) and major >= 9)
  return "tokamax" if mosaic_runs and tokamax_module() is not None else "xla"


def ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, *, impl: str = "auto", preferred_element_type=None):
  """[M, K] @ [G, K, N] with rows grouped by `group_sizes` (sum <= M) -> [M, N]; differentiable."""
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  if resolve_ragged_dot(impl) == "tokamax":
    _check("RAGGED_DOT_WEIGHT_GRAD", RAGGED_DOT_WEIGHT_GRAD, RAGGED_DOT_WEIGHT_GRADS)
    backend, kind, _ = _platform()
    try:
      if RAGGED_DOT_WEIGHT_GRAD != "tokamax" and _is_nvidia(backend, kind):
        return _tokamax_ragged_dot_own_wgrad(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type)
      return _tokamax_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type)
    except Exception as e:  # a trace-time refusal: fall back rather than fail the model
      if impl == "tokamax":
        raise
      _warn_once("ragged_dot", f"tokamax.ragged_dot failed ({type(e).__name__}: {e}); using jax.lax.ragged_dot")
  return jax.lax.ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type=preferred_element_type)


def _tokamax_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type):
  return tokamax_module().ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type=preferred_element_type)


def grouped_weight_grad(x_PK, dy_PN, group_sizes_G, *, tile: int = 1024):
  """[G, K, N] float32: per group g, x[rows of g]^T @ dy[rows of g] (rows grouped in order by
  `group_sizes`, sum <= P; rows past the groups ignored), the weight gradient of `ragged_dot`.
  Each group's rows are padded with zeros to whole `tile`-row tiles, every tile's [K, N] product
  is one batched matmul (float32 accumulation), and the tiles of a group are summed. Costs at most
  G * tile rows of zeros and a [P / tile + G, K, N] float32 intermediate."""
  (p, _), g = x_PK.shape, group_sizes_G.shape[0]
  n_tiles = p // tile + g                    # a static bound: each group wastes less than a tile
  sizes = group_sizes_G.astype(jnp.int32)
  start = jnp.cumsum(sizes) - sizes
  padded = (sizes + tile - 1) // tile * tile
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  row = jnp.arange(n_tiles * tile, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(padded_end, row, side="right"), g - 1)
  within = row - padded_start[group]
  valid = (within < sizes[group]) & (row < padded_end[-1])
  src = jnp.where(valid, start[group] + within, 0)
  tiles = lambda a: jnp.where(valid[:, None], a[src], 0).reshape(n_tiles, tile, a.shape[1])
  per_tile = jnp.einsum("trk,trn->tkn", tiles(x_PK), tiles(dy_PN), preferred_element_type=jnp.float32)
  tile_group = jnp.searchsorted(padded_end, jnp.arange(n_tiles, dtype=jnp.int32) * tile, side="right")
  return jax.ops.segment_sum(per_tile, tile_group, num_segments=g, indices_are_sorted=True)


def _weight_grad(lhs_MK, dout_MN, group_sizes_G):
  """The weight gradient RAGGED_DOT_WEIGHT_GRAD names ("pallas" or "tiled"), [G, K, N] float32."""
  pallas = _pallas_gpu_kernels() if RAGGED_DOT_WEIGHT_GRAD == "pallas" else None
  if pallas is not None and pallas.grouped_weight_grad_supported(lhs_MK.shape[1], dout_MN.shape[1]):
    return pallas.grouped_weight_grad(lhs_MK, dout_MN.astype(lhs_MK.dtype), group_sizes_G, interpret=_interpret())
  return grouped_weight_grad(lhs_MK, dout_MN, group_sizes_G)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tokamax_ragged_dot_own_wgrad(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type):
  """tokamax's ragged dot whose input gradient is tokamax's ragged dot on the transposed weights
  and whose weight gradient is ours (`_weight_grad`)."""
  return _tokamax_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type)


def _own_wgrad_fwd(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type):
  out = _tokamax_ragged_dot(lhs_MK, rhs_GKN, group_sizes_G, preferred_element_type)
  return out, (lhs_MK, rhs_GKN, group_sizes_G)


def _own_wgrad_bwd(preferred_element_type, res, dout_MN):
  lhs_MK, rhs_GKN, group_sizes_G = res
  dlhs = _tokamax_ragged_dot(dout_MN.astype(rhs_GKN.dtype), jnp.swapaxes(rhs_GKN, 1, 2), group_sizes_G, lhs_MK.dtype)
  drhs = _weight_grad(lhs_MK, dout_MN, group_sizes_G).astype(rhs_GKN.dtype)
  return dlhs.astype(lhs_MK.dtype), drhs, None


_tokamax_ragged_dot_own_wgrad.defvjp(_own_wgrad_fwd, _own_wgrad_bwd)


# ----------------------------------------------------------------------------- row gathers

def _pallas_gpu_kernels():
  """pallas_kernels.moe.triton on NVIDIA GPUs whose jax has the Pallas Triton backend, else None."""
  from pallas_kernels import _compat  # noqa: PLC0415  (the kernels package is imported on demand)
  backend, kind, _ = _platform()
  if not (_is_nvidia(backend, kind) and _compat.has_triton_backend()):
    return None
  from pallas_kernels.moe import triton  # noqa: PLC0415
  return triton


def _interpret() -> bool:
  """The Pallas kernels run interpreted where the process has no GPU (tests that pretend one)."""
  return jax.default_backend() != "gpu"


def gather_rows(x_ND, idx_P):
  """x[idx] for indices in [0, N): ROW_GATHER's kernel on NVIDIA GPUs where it tiles the shape,
  else XLA's gather."""
  _check("ROW_GATHER", ROW_GATHER, ROW_GATHERS)
  pallas = _pallas_gpu_kernels() if ROW_GATHER == "pallas" else None
  if pallas is not None and pallas.gather_rows_supported(idx_P.shape[0], x_ND.shape[1]):
    return pallas.gather_rows(x_ND, idx_P, interpret=_interpret())
  return x_ND[idx_P]


# ----------------------------------------------------------------------------- attention

def resolve_attention(impl: str = "auto", dtype=jnp.bfloat16, head_dim: int = 64) -> str:
  """-> "cudnn", "tokamax" or "xla" for inputs of `dtype` and `head_dim`."""
  impl = _requested("attention", impl, ATTENTION_IMPLS)
  if impl == "tokamax" and tokamax_module() is None:
    raise ValueError("attention: impl='tokamax' needs tokamax installed (>= 0.0.17 on jax >= 0.11)")
  if impl != "auto":
    return impl
  backend, kind, _ = _platform()
  if _is_nvidia(backend, kind):
    ok = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if ok and head_dim <= 128 and head_dim % 8 == 0 else "xla"
  if backend == "tpu" and tokamax_module() is not None:
    return "tokamax"
  return "xla"


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, *, mask=None, is_causal: bool, window: int | None,
                          scale: float, impl: str = "auto"):
  """Softmax attention; `window` w keeps keys s with 0 <= t - s <= w (needs is_causal).
  mask: bool, broadcastable to [B, N, T, S]."""
  if window is not None and not is_causal:
    raise ValueError("window: a sliding window needs is_causal=True")
  local = None if window is None else (int(window), 0)
  chosen = resolve_attention(impl, q_BTNH.dtype, q_BTNH.shape[-1])
  if chosen == "tokamax":
    try:
      return tokamax_module().dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=is_causal,
                                                    local_window_size=local, scale=scale)
    except Exception as e:
      if impl == "tokamax":
        raise
      _warn_once("attention-tokamax", f"tokamax attention failed ({type(e).__name__}: {e}); using XLA")
  elif chosen == "cudnn":
    try:
      return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=is_causal,
                                          local_window_size=local, scale=scale, implementation="cudnn")
    except Exception as e:
      if impl == "cudnn":
        raise
      _warn_once("attention-cudnn", f"cuDNN attention refused ({type(e).__name__}: {e}); using XLA")
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, is_causal=is_causal,
                                      local_window_size=local, scale=scale, implementation="xla")


# ----------------------------------------------------------------------------- LM loss

def plain_token_stats(h_ND, w, targets_N, mask_N, *, w_layout: str):
  """Reference: full float32 logits. -> (sum CE, sum logsumexp^2, number correct) over mask."""
  logits = _head(h_ND, w, w_layout)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets_N[:, None], axis=-1)[:, 0]
  correct = jnp.sum((jnp.argmax(logits, -1) == targets_N) * mask_N)
  return jnp.sum((lse - tgt) * mask_N), jnp.sum(jnp.square(lse) * mask_N), correct


def _head(h_CD, w, w_layout):
  spec = "cd,vd->cv" if w_layout == "vd" else "cd,dv->cv"
  return jnp.einsum(spec, h_CD, w, preferred_element_type=jnp.float32)


def _chunks(x, n_chunks):
  """[n * C, ...] -> [n, C, ...] taking every n-th token per chunk (so every chunk spans the
  whole, possibly data-sharded, token axis)."""
  return jnp.swapaxes(x.reshape((x.shape[0] // n_chunks, n_chunks) + x.shape[1:]), 0, 1)


def _unchunks(x):
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_stats(h_ND, w, targets_N, mask_N, w_layout, n_chunks):
  return _chunked_fwd(h_ND, w, targets_N, mask_N, w_layout, n_chunks)[0]


def _chunked_fwd(h_ND, w, targets_N, mask_N, w_layout, n_chunks):
  def body(acc, xs):
    h, t, m = xs
    logits = _head(h, w, w_layout)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    hit = (jnp.argmax(logits, -1) == t).astype(jnp.float32)
    ce, z, c = acc
    return (ce + jnp.sum((lse - tgt) * m), z + jnp.sum(jnp.square(lse) * m), c + jnp.sum(hit * m)), lse

  zero = jnp.zeros((), jnp.float32)
  xs = (_chunks(h_ND, n_chunks), _chunks(targets_N, n_chunks), _chunks(mask_N, n_chunks))
  out, lse = jax.lax.scan(body, (zero, zero, zero), xs)
  return out, (h_ND, w, targets_N, mask_N, lse)


def _chunked_bwd(w_layout, n_chunks, res, cts):
  h_ND, w, targets_N, mask_N, lse_nC = res
  g_ce, g_z, _ = cts

  def body(dw, xs):
    h, t, m, lse = xs
    logits = _head(h, w, w_layout)
    p = jnp.exp(logits - lse[:, None])
    # d/dlogits of CE = p - onehot(t); of lse^2 = 2 lse p.
    scale = (m * (g_ce + 2.0 * g_z * lse))[:, None]
    dlogits = p * scale - jax.nn.one_hot(t, p.shape[-1], dtype=jnp.float32) * (m * g_ce)[:, None]
    dl = dlogits.astype(w.dtype)
    if w_layout == "vd":
      dh = jnp.einsum("cv,vd->cd", dl, w, preferred_element_type=jnp.float32)
      dw = dw + jnp.einsum("cv,cd->vd", dl, h.astype(w.dtype), preferred_element_type=jnp.float32)
    else:
      dh = jnp.einsum("cv,dv->cd", dl, w, preferred_element_type=jnp.float32)
      dw = dw + jnp.einsum("cd,cv->dv", h.astype(w.dtype), dl, preferred_element_type=jnp.float32)
    return dw, dh.astype(h_ND.dtype)

  xs = (_chunks(h_ND, n_chunks), _chunks(targets_N, n_chunks), _chunks(mask_N, n_chunks), lse_nC)
  dw, dh = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), xs)
  return _unchunks(dh), dw.astype(w.dtype), None, None


_chunked_stats.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_token_stats(h_ND, w, targets_N, mask_N, *, w_layout: str, chunk_size: int = 1024):
  """The LM head and the token statistics of the loss, `chunk_size` tokens at a time.

  h_ND: final (normalised) hidden states; w: the head weight, [V, D] for `w_layout="vd"`
  (a tied embedding) or [D, V] for "dv", in the dtype the logits are computed in (float32
  accumulation). targets_N int, mask_N float (0 drops a token, e.g. segment padding).
  -> (sum of CE, sum of logsumexp^2, number correct) over masked tokens, float32, like the
  plain path; gradients reach h and w (logits recomputed per chunk in the backward), so at
  most `chunk_size` x V float32 logits live at once. Any token count works (zero-mask padding).
  """
  if w_layout not in ("vd", "dv"):
    raise ValueError(f"w_layout: expected 'vd' or 'dv', got {w_layout!r}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
  n = h_ND.shape[0]
  n_chunks = max(1, -(-n // chunk_size))
  pad = (-n) % n_chunks
  targets_N = targets_N.astype(jnp.int32)
  mask_N = mask_N.astype(jnp.float32)
  if pad:
    h_ND = jnp.pad(h_ND, ((0, pad), (0, 0)))
    targets_N = jnp.pad(targets_N, (0, pad))
    mask_N = jnp.pad(mask_N, (0, pad))
  mask_N = jax.lax.stop_gradient(mask_N)
  return _chunked_stats(h_ND, w, targets_N, mask_N, w_layout, n_chunks)
