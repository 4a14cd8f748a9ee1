"""The causal LM: token embedding, blocks from the config's per-layer pattern, final norm, head.

Block kinds (per layer, `cfg.layer_kinds`):
- transformer / swa / deltanet / gated_deltanet / gla / linear_attention: pre-norm
  `x + mixer(norm(x))`, then `x + mlp(norm(x))` (mixer: global attention, sliding-window
  attention, or a recurrence);
- rodimus: `x + Rodimus(norm(x))`, no MLP;
- rodimus_plus: `r1 = x + Rodimus(n1(x)); a = SWSKA(n2(r1)); f = FFN(n3(r1 + a))`, out `r1 + f`
  (code) or `r1 + a + f` (`rodimus_plus_residual="plain"`);
- dijiang: GPT-NeoX parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`; the other two-sub-layer
  kinds use that form too with `parallel_residual=True` (a GPT-NeoX / Pythia host).
MLPs are SwiGLU (GELU for DiJiang's host or with `mlp_kind="gelu"|"gelu_tanh"`) or, with
`n_experts > 0`, a dropless MoE.

Calls:
- `model(tokens_BT, segment_ids=None)` -> float32 logits `[B, T, vocab]`;
  `model(tokens_BT, segment_ids, return_aux=True)` -> `(logits, aux)` with
  `aux["moe_aux_loss"]` = `aux_loss_coef * load_balance` (add it to the training loss; zero for
  dense models) and `aux["moe_load_balance"]` = the unscaled `E * sum_e f_e P_e` over all MoE
  layers' tokens together.
- Dropout (`config.dropout` or `config.attention_dropout` > 0) runs only when a PRNG key is passed, `model(..., dropout_key=k)`
  / `model.hidden(..., dropout_key=k)` (the train step does); without one (eval, prefill,
  decode) the model is deterministic.
- `model.hidden(tokens_BT, segment_ids=None, return_aux=False)` -> the normalised final hidden
  states `[B, T, D]` (compute dtype; `(h, aux)` with return_aux) and `model.head_weight()` ->
  `(w, layout)`: logits = h @ w for layout "dv" (`[D, V]`), h @ w.T for "vd" (the tied
  embedding), in the compute dtype with float32 accumulation. The training loss uses these with
  `efficient_lm.kernels.chunked_token_stats` so the `[B, T, vocab]` logits never exist at once.
- `model.init_cache(batch_size, max_len)`, `model.prefill(tokens_BT, max_len) -> (logits, cache)`
  (one document per row, empty cache), `model.decode(tokens_B1, cache) -> (logits_B1V, cache)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_lm.configs import ModelConfig
from efficient_lm.layers.attention import Attention
from efficient_lm.layers.core import Dense, Embed, dropout_fn, normal, param
from efficient_lm.layers.mixers import GLA, DeltaNet, DiJiang, LinearAttention, Rodimus
from efficient_lm.layers.mlp import GeluMLP, SwiGLU
from efficient_lm.layers.moe import MoE, load_balancing_loss
from efficient_lm.layers.norms import make_norm
from efficient_lm.layers.rope import positions
from pallas_kernels.common.chunking import segment_runs
from efficient_lm.layers.router import RouterCell


def _out_scale(cfg: ModelConfig) -> float:
  return (cfg.out_proj_rescale * cfg.n_layers) ** -0.5 if cfg.out_proj_rescale else 1.0


def make_mixer(cfg: ModelConfig, kind: str, rngs: nnx.Rngs):
  kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std,
            rope_base=cfg.rope_base, rope_fraction=cfg.rope_fraction)
  if kind in ("transformer", "swa"):
    kv = cfg.n_kv_heads or cfg.n_heads
    return Attention(cfg.d_model, cfg.n_heads, kv, kv, cfg.attn_head_dim,
                     window=cfg.window if kind == "swa" else None, out_scale=_out_scale(cfg),
                     use_bias=cfg.attn_bias, **kw)
  if kind in ("rodimus", "rodimus_plus"):
    return Rodimus(cfg, rngs=rngs)
  if kind in ("deltanet", "gated_deltanet"):
    return DeltaNet(cfg, gated=kind == "gated_deltanet", rngs=rngs)
  if kind == "gla":
    return GLA(cfg, rngs=rngs)
  if kind == "linear_attention":
    return LinearAttention(cfg, rngs=rngs)
  if kind == "dijiang":
    return DiJiang(cfg, rngs=rngs)
  raise ValueError(f"layer_pattern: unknown layer kind {kind!r}")


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, kind: str, layer: int, *, rngs: nnx.Rngs):
    d = cfg.d_model
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype, std=cfg.init_std)
    self.kind = kind
    self.norm1 = make_norm(cfg, d, rngs)
    self.mixer = make_mixer(cfg, kind, rngs)
    sw_ska = kind == "rodimus_plus"   # SW-SKA: all query heads share one key head
    self.norm2 = None if kind == "rodimus" else make_norm(cfg, d, rngs)
    self.attn = (Attention(d, cfg.n_heads, 1, cfg.n_heads, cfg.attn_head_dim, window=cfg.window,
                           rope_base=cfg.rope_base, rope_fraction=1.0, out_scale=_out_scale(cfg), **kw)
                 if sw_ska else None)
    self.norm3 = make_norm(cfg, d, rngs) if sw_ska else None
    if kind == "rodimus":
      self.mlp = None
    elif cfg.is_moe_layer(layer):
      self.mlp = MoE(cfg, rngs=rngs)
    elif kind == "dijiang" or cfg.mlp_kind != "swiglu":
      self.mlp = GeluMLP(d, cfg.mlp_hidden_size, approximate=cfg.mlp_kind == "gelu_tanh", **kw)
    else:
      self.mlp = SwiGLU(d, cfg.mlp_hidden_size, out_scale=_out_scale(cfg), **kw)
    self.plain_residual = cfg.rodimus_plus_residual == "plain"
    self.parallel_residual = cfg.parallel_residual
    self.dropout, self.attention_dropout = cfg.dropout, cfg.attention_dropout

  def _mlp(self, h, router_state, cell, drop=None):
    if isinstance(self.mlp, MoE):
      f, router_state, stats = self.mlp(h, router_state, cell)
    else:
      f, stats = self.mlp(h), None
    return (f if drop is None else drop(f, 2)), router_state, stats

  def _run(self, x, mix, attn, router_state, cell, drop=None):
    """The block's residual structure; `mix`/`attn` map a normalised input to (y, cache).
    `drop(y, slot)` (training only) is dropout on each branch output before its residual add."""
    add = lambda a, b: a + b.astype(a.dtype)
    caches = {}
    y, caches["mixer"] = mix(self.norm1(x))
    if drop is not None:
      y = drop(y, 0)
    stats = None
    if self.kind == "rodimus":
      x = add(x, y)
    elif self.kind == "rodimus_plus":
      r1 = add(x, y)
      a, caches["attn"] = attn(self.norm2(r1))
      if drop is not None:
        a = drop(a, 1)
      f, router_state, stats = self._mlp(self.norm3(add(r1, a)), router_state, cell, drop)
      x = add(add(r1, a), f) if self.plain_residual else add(r1, f)
    elif self.kind == "dijiang":   # parallel residual
      f, router_state, stats = self._mlp(self.norm2(x), router_state, cell, drop)
      x = add(add(x, y), f)
    elif self.parallel_residual:   # GPT-NeoX: both branches read the block input
      f, router_state, stats = self._mlp(self.norm2(x), router_state, cell, drop)
      x = add(add(x, y), f)
    else:
      x = add(x, y)
      f, router_state, stats = self._mlp(self.norm2(x), router_state, cell, drop)
      x = add(x, f)
    return x, caches, router_state, stats

  def __call__(self, x_BTD, seg_BT, pos_BT, router_state, cell, dropout_key=None):
    """`dropout_key`: None (deterministic) or this block's PRNG key in training."""
    def no_cache(layer, slot):
      if dropout_key is not None and self.attention_dropout > 0.0 and isinstance(layer, Attention):
        probs_drop = (self.attention_dropout, jax.random.fold_in(dropout_key, slot))
        return lambda h: (layer(h, seg_BT, pos_BT, dropout=probs_drop), None)
      return lambda h: (layer(h, seg_BT, pos_BT), None)
    drop = None
    if dropout_key is not None and self.dropout > 0.0:
      drop = lambda y, slot: dropout_fn(y, self.dropout, jax.random.fold_in(dropout_key, slot))
    # slots 0-2: the branch outputs (`_run`); 3, 4: the attention probabilities of mixer and attn
    x, _, router_state, stats = self._run(x_BTD, no_cache(self.mixer, 3), self.attn and no_cache(self.attn, 4),
                                          router_state, cell, drop)
    return x, router_state, stats

  def prefill(self, x_BTD, pos_BT, max_len, router_state, cell):
    pre = lambda layer: (lambda h: layer.prefill(h, pos_BT, max_len))
    x, caches, router_state, _ = self._run(x_BTD, pre(self.mixer), self.attn and pre(self.attn),
                                           router_state, cell)
    return x, caches, router_state

  def step(self, x_BD, cache, pos, router_state, cell):
    stepper = lambda layer, c: (lambda h: layer.step(h, c, pos))
    attn = self.attn and stepper(self.attn, cache["attn"])
    x, caches, router_state, _ = self._run(x_BD, stepper(self.mixer, cache["mixer"]), attn, router_state, cell)
    return x, caches, router_state

  def init_cache(self, batch_size, max_len):
    cache = {"mixer": self.mixer.init_cache(batch_size, max_len)}
    if self.attn is not None:
      cache["attn"] = self.attn.init_cache(batch_size, max_len)
    return cache


class LM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.blocks = nnx.List([Block(cfg, kind, i, rngs=rngs) for i, kind in enumerate(cfg.layer_kinds)])
    recurrent = cfg.n_experts > 0 and cfg.router == "recurrent"
    self.router_cell = RouterCell(cfg.router_dim, cfg.router_cell, rngs=rngs, std=cfg.init_std) if recurrent else None
    self.norm_f = make_norm(cfg, cfg.d_model, rngs)
    self.lm_head = (None if cfg.tie_embeddings else
                    param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                          cfg.param_dtype))

  def _logits(self, x):
    x = self.norm_f(x)
    if self.lm_head is None:
      return self.embed.attend(x)
    dt = self.config.compute_dtype
    return jnp.einsum("...d,dv->...v", x.astype(dt), self.lm_head[...].astype(dt),
                      preferred_element_type=jnp.float32)

  def _router_state(self, n_tokens: int):
    return None if self.router_cell is None else jnp.zeros((n_tokens, self.config.router_dim), jnp.float32)

  def __call__(self, tokens_BT, segment_ids=None, *, return_aux: bool = False, dropout_key=None):
    """`dropout_key`: a PRNG key turns on `config.dropout` (training); None is deterministic."""
    x, stats = self._trunk(tokens_BT, segment_ids, dropout_key)
    logits = self._logits(x)
    return (logits, self._aux(stats)) if return_aux else logits

  def hidden(self, tokens_BT, segment_ids=None, *, return_aux: bool = False, dropout_key=None):
    """Normalised final hidden states [B, T, D] in the head's compute dtype (the logits are
    `h @ w` with `head_weight()`); `dropout_key` as in `__call__`."""
    x, stats = self._trunk(tokens_BT, segment_ids, dropout_key)
    w, _ = self.head_weight()
    h = self.norm_f(x).astype(w.dtype)
    return (h, self._aux(stats)) if return_aux else h

  def head_weight(self):
    """-> (w, layout): the LM head in its compute dtype; layout "vd" ([V, D], tied) or "dv"."""
    if self.lm_head is None:
      return self.embed.embedding[...].astype(self.embed.dtype), "vd"
    return self.lm_head[...].astype(self.config.compute_dtype), "dv"

  def _trunk(self, tokens_BT, segment_ids, dropout_key=None):
    b, t = tokens_BT.shape
    # Every layer's masks compare ids; renumbered by run, an id that comes back is a new document.
    segment_ids = None if segment_ids is None else segment_runs(segment_ids)
    x = self.embed(tokens_BT).astype(self.config.stream_dtype)
    rate = self.config.dropout
    if dropout_key is not None and rate > 0.0:   # nanoGPT: after the embedding, then each branch output
      x = dropout_fn(x, rate, jax.random.fold_in(dropout_key, 0))
    pos_BT = positions(segment_ids, b, t)
    router_state = self._router_state(b * t)
    stats = []
    for i, block in enumerate(self.blocks):
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, i + 1)
      x, router_state, s = block(x, segment_ids, pos_BT, router_state, self.router_cell, key)
      if s is not None:
        stats.append(s)
    return x, stats

  def _aux(self, stats):
    aux = {"moe_aux_loss": jnp.zeros((), jnp.float32), "moe_load_balance": jnp.zeros((), jnp.float32)}
    if stats:
      total = jax.tree.map(lambda *xs: sum(xs), *stats)
      lb = load_balancing_loss(total["counts"], total["prob_sum"], total["tokens"])
      aux = {"moe_aux_loss": self.config.aux_loss_coef * lb, "moe_load_balance": lb}
    return aux

  def init_cache(self, batch_size: int, max_len: int):
    """Decode state: `pos` (tokens seen) and one cache per layer (see models/cache.py)."""
    return {"pos": jnp.zeros((), jnp.int32),
            "layers": [blk.init_cache(batch_size, max_len) for blk in self.blocks]}

  def prefill(self, tokens_BT, max_len: int):
    """Full forward over a prompt (one document per row) -> (logits_BTV, cache at position T)."""
    b, t = tokens_BT.shape
    if t > max_len:
      raise ValueError(f"max_len: prompt of {t} tokens does not fit max_len={max_len}")
    x = self.embed(tokens_BT).astype(self.config.stream_dtype)
    pos_BT = positions(None, b, t)
    router_state = self._router_state(b * t)
    layers = []
    for block in self.blocks:
      x, cache, router_state = block.prefill(x, pos_BT, max_len, router_state, self.router_cell)
      layers.append(cache)
    return self._logits(x), {"pos": jnp.asarray(t, jnp.int32), "layers": layers}

  def decode(self, tokens_B1, cache):
    """One token per row at position `cache["pos"]` -> (logits_B1V, cache advanced by one)."""
    pos = cache["pos"]
    x = self.embed(tokens_B1[:, 0]).astype(self.config.stream_dtype)
    router_state = self._router_state(tokens_B1.shape[0])
    layers = []
    for block, layer_cache in zip(self.blocks, cache["layers"]):
      x, layer_cache, router_state = block.step(x, layer_cache, pos, router_state, self.router_cell)
      layers.append(layer_cache)
    return self._logits(x)[:, None], {"pos": pos + 1, "layers": layers}


_NO_DECAY_NAMES = ("embedding",)


def weight_decay_mask(params):
  """True where a parameter gets weight decay: matrices and expert tensors (ndim >= 2), except
  the embedding. Biases, norm weights and the per-model vectors (`w_res`, `A_log`, `dt_bias`,
  gate biases, DiJiang decays) are 1-D and get none. Works on `nnx.state(model, nnx.Param)`
  or any pytree of parameters keyed by name."""
  def decays(path, leaf):
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return bool(jnp.ndim(leaf) >= 2 and not names & set(_NO_DECAY_NAMES))
  return jax.tree_util.tree_map_with_path(decays, params)
