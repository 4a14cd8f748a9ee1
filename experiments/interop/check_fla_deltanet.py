"""GPU check of the fla DeltaNet loader (issue 7): a tiny random fla `DeltaNetForCausalLM` on
CUDA, saved with save_pretrained, loaded with `efficient_lm.interop.load_fla_deltanet`; logits
compared on random tokens, with and without the output gate, with tied and untied embeddings.
- float32: fla 0.6's chunked kernel refuses float32, so these cases set `attn_mode=
  "fused_recurrent"` (fla's exact recurrent kernel) at T <= 64 and T > 64;
- bfloat16: fla's model in bf16 with its chunked kernel (T > 64), our model loaded from the same
  bf16 checkpoint with float32 parameters and compute; the error is bf16 rounding (--tol-bf16).

    python experiments/interop/check_fla_deltanet.py --out experiments/interop/results/fla_deltanet.json

Needs torch with CUDA, fla (flash-linear-attention, tested against 0.6.0) and transformers.
Prints one line per case and writes JSON; exits 1 if any case fails or errors. fla's Triton
recurrent kernel accumulates in float32; TF32 is switched off on both sides (torch flags, JAX
matmul precision "highest"). The relative (Frobenius) error must be below --tol (float32) or
--tol-bf16; the max abs error is reported too.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CASES = [
    # name, DeltaNetConfig overrides, sequence lengths, fla's dtype
    ("base_fp32", {"attn_mode": "fused_recurrent"}, (48, 200), "float32"),
    ("gated_output_fp32", {"attn_mode": "fused_recurrent", "use_gate": True}, (48, 200), "float32"),
    ("tied_expand_k_half_fp32", {"attn_mode": "fused_recurrent", "tie_word_embeddings": True, "expand_k": 0.5},
     (200,), "float32"),
    ("base_bf16_chunk", {"attn_mode": "chunk"}, (200,), "bfloat16"),
    ("gated_output_bf16_chunk", {"attn_mode": "chunk", "use_gate": True}, (200,), "bfloat16"),
]


def _fla_classes():
  try:
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM
  except ImportError:
    from fla.models.delta_net import DeltaNetConfig, DeltaNetForCausalLM
  return DeltaNetConfig, DeltaNetForCausalLM


def run_case(name, overrides, lengths, dtype, args, torch, jax, np):
  from efficient_lm.interop import load_fla_deltanet

  DeltaNetConfig, DeltaNetForCausalLM = _fla_classes()
  kw = dict(hidden_size=args.hidden, num_heads=args.heads, num_hidden_layers=args.layers, vocab_size=args.vocab,
            expand_k=1.0, expand_v=1.0, use_gate=False, use_short_conv=True, conv_size=4, attn_mode="chunk",
            fuse_cross_entropy=False, tie_word_embeddings=False)
  kw.update(overrides)
  torch.manual_seed(args.seed)
  config = DeltaNetConfig(**kw)
  model = DeltaNetForCausalLM(config).to(device="cuda", dtype=torch.float32).eval()
  with torch.no_grad():   # norm weights off their init of ones, so a swapped norm would show
    for pname, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(torch.randn_like(p) * 0.2)
  model = model.to(getattr(torch, dtype))
  tol = args.tol if dtype == "float32" else args.tol_bf16
  out = {"case": name, "config": kw, "fla_dtype": dtype, "tol": tol, "lengths": {}}
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    out["saved_files"] = sorted(os.listdir(tmp))
    t0 = time.time()
    ours = load_fla_deltanet(tmp, param_dtype="float32", impl=args.impl)
    out["load_s"] = round(time.time() - t0, 3)
  out["our_config"] = {k: getattr(ours.config, k) for k in ("d_model", "n_heads", "head_dim", "expand_v",
                                                             "use_output_gate", "mlp_hidden", "tie_embeddings")}
  rng = np.random.default_rng(args.seed)
  ok = True
  forward = jax.jit(lambda x: ours(x))
  for t in lengths:
    toks = rng.integers(0, args.vocab, (args.batch, t))
    mode = "fused_recurrent" if t <= 64 else kw["attn_mode"]   # fla's layer switches at 64 tokens
    try:
      with torch.no_grad():
        ref = model(torch.as_tensor(toks, device="cuda")).logits.float().cpu().numpy().astype(np.float64)
      got = np.asarray(forward(toks), np.float64)
    except Exception as e:  # noqa: BLE001 - record this length, go on with the next
      traceback.print_exc()
      out["lengths"][str(t)] = {"fla_mode": mode, "passed": False, "error": f"{type(e).__name__}: {e}"}
      ok = False
      continue
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    max_abs = float(np.abs(got - ref).max())
    passed = bool(np.isfinite(got).all() and rel < tol)
    ok &= passed
    out["lengths"][str(t)] = {"fla_mode": mode, "rel_err": rel, "max_abs_err": max_abs,
                              "ref_abs_max": float(np.abs(ref).max()), "passed": passed}
    print(f"{name:26s} T={t:4d} fla={mode:15s} rel_err={rel:.3e}  max_abs_err={max_abs:.3e}  "
          f"{'ok' if passed else 'FAIL'}", flush=True)
  out["passed"] = ok
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True, help="JSON output path")
  ap.add_argument("--tol", type=float, default=1e-4, help="max relative (Frobenius) logits error, float32")
  ap.add_argument("--tol-bf16", type=float, default=3e-2, help="the same for fla in bfloat16")
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--vocab", type=int, default=512)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--impl", default="auto", help="our recurrence form: auto | scan | chunk | pallas")
  args = ap.parse_args()

  import jax
  jax.config.update("jax_default_matmul_precision", "highest")   # no TF32 on our side
  import numpy as np
  import torch
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False

  report = {"script": "experiments/interop/check_fla_deltanet.py", "tol": args.tol, "args": vars(args),
            "python": platform.python_version(), "cases": []}
  versions = {"torch": torch.__version__, "jax": jax.__version__}
  for mod in ("fla", "transformers", "triton"):
    try:
      versions[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001 - a version we cannot read is reported, not fatal
      versions[mod] = f"unavailable: {e}"
  report["versions"] = versions
  report["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
  report["jax_devices"] = [str(d) for d in jax.devices()]
  print(json.dumps(versions), report["cuda_device"], flush=True)
  if not torch.cuda.is_available():
    report["error"] = "CUDA is not available to torch (fla's kernels are Triton GPU kernels)"
  else:
    for name, overrides, lengths, dtype in CASES:
      try:
        report["cases"].append(run_case(name, overrides, lengths, dtype, args, torch, jax, np))
      except Exception as e:  # noqa: BLE001 - record and go on with the other cases
        traceback.print_exc()
        report["cases"].append({"case": name, "passed": False, "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()})
  report["passed"] = bool(report["cases"]) and all(c["passed"] for c in report["cases"]) and "error" not in report
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(f"{'PASSED' if report['passed'] else 'FAILED'}; wrote {out}", flush=True)
  sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
  main()
