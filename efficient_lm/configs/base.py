"""The model config: one frozen dataclass, validated once, with the family rules as properties.

A field is part of the config when it changes a logit, so a peer's checkpoint
loads to the peer's numbers; each preset sets it the way the family's official
code does (see ../shared/spec/models.md).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

# Block kinds a model (and each layer of a hybrid pattern) can be made of.
# "swa" is a transformer block with sliding-window attention; it exists for hybrid patterns.
BLOCK_KINDS = ("transformer", "rodimus", "rodimus_plus", "deltanet", "gated_deltanet", "gla", "dijiang",
               "linear_attention")
LAYER_KINDS = BLOCK_KINDS + ("swa",)
MLP_KINDS = ("swiglu", "gelu", "gelu_tanh")
IMPLS = ("auto", "scan", "chunk", "pallas")
ROUTERS = ("linear", "recurrent")
ROUTER_CELLS = ("gru", "rnn")
DTYPES = ("float32", "bfloat16", "float16")
FEATURE_MAPS = ("elu", "relu", "identity")   # linear attention's phi on q and k


def round_up(x: int, multiple: int) -> int:
  return multiple * math.ceil(x / multiple)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines a model. Unset (None) sizes follow the family rules below."""

  kind: str = "transformer"
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  head_dim: int | None = None          # None: d_model // n_heads (DeltaNet: the KEY head dim)
  n_kv_heads: int | None = None        # transformer attention (GQA); None: n_heads
  mlp_hidden: int | None = None        # None: the family rule (`mlp_hidden_size`)
  layer_pattern: tuple[str, ...] = ()  # hybrids: one LAYER_KINDS entry per layer; (): `kind` everywhere
  window: int | None = None            # sliding window w: query t sees keys s with 0 <= t - s <= w
  norm: str = "rms"                    # "rms" | "layer" (LayerNorm with bias: the GPT-NeoX host)
  norm_eps: float = 1e-6
  residual_dtype: str = "compute"      # "float32" | "compute" (the compute dtype)
  tie_embeddings: bool = False
  rope_base: float = 10000.0
  rope_fraction: float = 1.0           # partial rotary: the first fraction of each head's dims
  conv_size: int = 4
  dropout: float = 0.0                 # training only: after the embedding and on each mixer / MLP output
  attention_dropout: float = 0.0       # training only: on softmax attention's probabilities (nanoGPT's attn_dropout)
  # GPT-NeoX host options (transformer / swa blocks; the defaults keep Transformer++)
  parallel_residual: bool = False      # x + mixer(norm1(x)) + mlp(norm2(x)) (GPT-NeoX / Pythia)
  attn_bias: bool = False              # biases on the q, k, v and output projections of attention
  mlp_kind: str = "swiglu"             # "swiglu" | "gelu" (exact) | "gelu_tanh": dense MLP (DiJiang: always GELU)
  init_std: float = 0.02
  out_proj_rescale: int = 0            # n: out projections / sqrt(n * n_layers) (Rodimus 1, Rodimus+ 3); 0 off
  # Rodimus / Rodimus+
  mem_size: int = 64
  rodimus_k_eps: float = 1e-12         # F.normalize eps on k (released Rodimus+-Coder: 1e-5)
  rodimus_plus_residual: str = "code"  # "code": attention output only feeds the FFN; "plain": x + a + f
  # DeltaNet / Gated DeltaNet
  expand_v: float = 1.0
  use_short_conv: bool | None = None   # convs on q, k, v (DeltaNet, GLA); None: FLA's default (DeltaNet on, GLA off)
  conv_init: str = "normal"            # their weights: "normal" N(0, init_std) as FLA | "torch" PyTorch Conv1d's
                                       # U(+-1/sqrt(conv_size)), as Zoology's MQAR models (std 14x larger at 4 taps)
  use_output_gate: bool = False        # rmsnorm(o) * silu(W_g h) instead of rmsnorm(o)
  allow_neg_eigval: bool = False       # beta = 2 * sigmoid(.)
  # GLA (FLA's layer)
  expand_k: float = 0.5
  gate_low_rank: int = 16
  gate_logit_normalizer: float = 16.0
  # Plain linear attention (FLA's layer; also uses expand_k / expand_v)
  feature_map: str = "elu"             # phi on q and k: "elu" (elu + 1) | "relu" | "identity"
  # DiJiang
  dijiang_learn_decay: bool = False    # (ours) learnable per-head log decay; default fixed gamma
  # Mixture of experts (n_experts = 0: dense MLPs)
  n_experts: int = 0
  top_k: int = 2
  expert_hidden: int | None = None     # None: mlp_hidden_size
  router: str = "linear"               # "linear" (SMoE) | "recurrent" (RMoE)
  router_dim: int = 256
  router_cell: str = "gru"             # "gru" | "rnn" (the ablation)
  moe_first_dense: int = 0             # the first layers keep a dense MLP
  shared_expert: bool = False          # y = 0.5 * moe + 0.5 * shared
  aux_loss_coef: float = 0.001
  # Numerics
  impl: str = "auto"                   # recurrence form, passed to pallas_kernels
  chunk_size: int = 64
  dtype: str = "float32"               # compute dtype
  param_dtype: str = "float32"

  # -- derived -------------------------------------------------------------------------------
  @property
  def layer_kinds(self) -> tuple[str, ...]:
    return tuple(self.layer_pattern) if self.layer_pattern else (self.kind,) * self.n_layers

  @property
  def uses_dropout(self) -> bool:
    """Whether a train step must pass the model a dropout key."""
    return self.dropout > 0.0 or self.attention_dropout > 0.0

  def short_conv(self, layer_default: bool) -> bool:
    """Whether a mixer puts short convs on q, k, v: `use_short_conv`, else the layer's default."""
    return layer_default if self.use_short_conv is None else self.use_short_conv

  @property
  def attn_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def mlp_hidden_size(self) -> int:
    if self.mlp_hidden is not None:
      return self.mlp_hidden
    d = self.d_model
    if self.kind == "rodimus_plus":
      return round_up(int(d * 4 / 3), 8)
    if self.kind == "dijiang" or self.mlp_kind != "swiglu":
      return 4 * d
    return 256 * math.ceil(int(8 * d / 3) / 256)  # Llama / FLA rule

  @property
  def d_inner(self) -> int:
    """Rodimus's expanded width."""
    return round_up(2 * self.d_model, 8)

  @property
  def low_rank(self) -> int:
    """Rodimus's channel-gate rank."""
    return max(self.d_model // 64, 16)

  def is_moe_layer(self, layer: int) -> bool:
    return self.n_experts > 0 and layer >= self.moe_first_dense

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def stream_dtype(self):
    return jnp.dtype(jnp.float32 if self.residual_dtype == "float32" else self.dtype)


def _fail(field: str, msg: str):
  raise ValueError(f"{field}: {msg}")


def validate(cfg: ModelConfig) -> ModelConfig:
  """Raises ValueError naming the offending field; returns cfg unchanged."""
  if cfg.kind not in BLOCK_KINDS:
    _fail("kind", f"unknown block kind {cfg.kind!r}; expected one of {BLOCK_KINDS}")
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "conv_size", "mem_size", "chunk_size"):
    if int(getattr(cfg, name)) < 1:
      _fail(name, f"expected a positive int, got {getattr(cfg, name)!r}")
  if cfg.layer_pattern:
    if len(cfg.layer_pattern) != cfg.n_layers:
      _fail("layer_pattern", f"has {len(cfg.layer_pattern)} entries for n_layers={cfg.n_layers}")
    for k in cfg.layer_pattern:
      if k not in LAYER_KINDS:
        _fail("layer_pattern", f"unknown layer kind {k!r}; expected one of {LAYER_KINDS}")
  kinds = set(cfg.layer_kinds)
  if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
    _fail("n_heads", f"{cfg.n_heads} heads do not divide d_model={cfg.d_model}")
  if cfg.n_kv_heads is not None and (cfg.n_kv_heads < 1 or cfg.n_heads % cfg.n_kv_heads):
    _fail("n_kv_heads", f"{cfg.n_kv_heads} must be >= 1 and divide n_heads={cfg.n_heads}")
  if kinds & {"gla", "linear_attention"}:
    for name in ("expand_k", "expand_v"):
      width = cfg.d_model * getattr(cfg, name)
      if width != int(width) or int(width) % cfg.n_heads:
        _fail(name, f"d_model * {name} = {width} is not divisible by n_heads={cfg.n_heads}")
  if kinds & {"deltanet", "gated_deltanet"}:
    vd = cfg.attn_head_dim * cfg.expand_v
    if vd != int(vd):
      _fail("expand_v", f"head_dim * expand_v = {vd} is not an integer")
  if kinds & {"swa", "rodimus_plus"} and cfg.window is None:
    _fail("window", "sliding-window layers need a window")
  if cfg.window is not None and cfg.window <= 0:
    _fail("window", f"expected a positive window, got {cfg.window}")
  if cfg.rope_fraction <= 0 or cfg.rope_fraction > 1 or int(cfg.attn_head_dim * cfg.rope_fraction) % 2:
    _fail("rope_fraction", f"{cfg.rope_fraction} must be in (0, 1] and give an even rotary dim")
  if "dijiang" in kinds and cfg.d_model % cfg.attn_head_dim:
    _fail("head_dim", "DiJiang's GroupNorm needs head_dim dividing d_model")
  if cfg.conv_init not in ("normal", "torch"):
    _fail("conv_init", f"expected 'normal' or 'torch', got {cfg.conv_init!r}")
  if cfg.feature_map not in FEATURE_MAPS:
    _fail("feature_map", f"expected one of {FEATURE_MAPS}, got {cfg.feature_map!r}")
  for name in ("dropout", "attention_dropout"):
    if not 0.0 <= getattr(cfg, name) < 1.0:
      _fail(name, f"expected 0 <= {name} < 1, got {getattr(cfg, name)!r}")
  if cfg.norm not in ("rms", "layer"):
    _fail("norm", f"expected 'rms' or 'layer', got {cfg.norm!r}")
  if cfg.mlp_kind not in MLP_KINDS:
    _fail("mlp_kind", f"expected one of {MLP_KINDS}, got {cfg.mlp_kind!r}")
  if cfg.residual_dtype not in ("float32", "compute"):
    _fail("residual_dtype", f"expected 'float32' or 'compute', got {cfg.residual_dtype!r}")
  if cfg.rodimus_plus_residual not in ("code", "plain"):
    _fail("rodimus_plus_residual", f"expected 'code' or 'plain', got {cfg.rodimus_plus_residual!r}")
  if cfg.impl not in IMPLS:
    _fail("impl", f"expected one of {IMPLS}, got {cfg.impl!r}")
  for name in ("dtype", "param_dtype"):
    if getattr(cfg, name) not in DTYPES:
      _fail(name, f"expected one of {DTYPES}, got {getattr(cfg, name)!r}")
  if cfg.n_experts < 0:
    _fail("n_experts", f"expected >= 0, got {cfg.n_experts}")
  if cfg.n_experts:
    if not 1 <= cfg.top_k <= cfg.n_experts:
      _fail("top_k", f"expected 1 <= top_k <= n_experts={cfg.n_experts}, got {cfg.top_k}")
    if cfg.router not in ROUTERS:
      _fail("router", f"expected one of {ROUTERS}, got {cfg.router!r}")
    if cfg.router_cell not in ROUTER_CELLS:
      _fail("router_cell", f"expected one of {ROUTER_CELLS}, got {cfg.router_cell!r}")
    if kinds <= {"rodimus"}:
      _fail("n_experts", "Rodimus blocks have no MLP to replace with experts")
  return cfg


def every_other(n_layers: int, base: str, other: str) -> tuple[str, ...]:
  """`base` at even layers (0-based), `other` at odd ones: e.g. DeltaNet + sliding attention."""
  return tuple(other if i % 2 else base for i in range(n_layers))


def at_layers(n_layers: int, base: str, other: str, layers_1based) -> tuple[str, ...]:
  """`other` at the given 1-based layers (DeltaNet + global attention at 2 and N/2 + 1)."""
  chosen = set(layers_1based)
  return tuple(other if i + 1 in chosen else base for i in range(n_layers))
