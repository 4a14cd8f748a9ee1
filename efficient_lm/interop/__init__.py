"""Weight interop: peers' checkpoints in, our own models out.

    model = load_gpt_neox("pythia-160m/")          # config.json + *.safetensors (or pytorch_model.bin)
    dj = convert_to_dijiang(model, learn_decay=True)   # keeps q/k/v/dense, adds DiJiang's new parameters
    calibrate_dijiang(dj, model, tokens_BT)        # fits those to one batch of the teacher
    transfer_attention(dj, model, next_tokens, 10)  # trains the mixers on the teacher's attention outputs
    step = make_distill_step(graphdef, opt, schedule)  # fine-tunes toward the teacher's logits
    model = load_fla_deltanet("delta_net-340M/")   # fla DeltaNetForCausalLM
    model = load_rodimus("rodimus_plus-1.6b/")     # official Rodimus / Rodimus+
    save_safetensors(model, "out/"); model = load_safetensors("out/")   # exact round trip

Every loader takes `param_dtype=None` (keep the checkpoint's dtype; a name casts) and config
overrides (`impl=`, `dtype=` for compute). Missing, unknown or mis-shaped tensors raise
`CheckpointMismatch` listing all of them. The external names read are listed in each module.
"""
from efficient_lm.interop.dijiang import calibrate_dijiang, convert_to_dijiang, transfer_attention
from efficient_lm.interop.distill import kl_to_teacher, make_distill_step, with_teacher_logits
from efficient_lm.interop.export import load_safetensors, model_tensors, save_safetensors
from efficient_lm.interop.fla_deltanet import (fla_deltanet_config, fla_deltanet_from_state_dict,
                                               fla_deltanet_rules, load_fla_deltanet)
from efficient_lm.interop.gpt_neox import gpt_neox_config, gpt_neox_from_state_dict, gpt_neox_rules, load_gpt_neox
from efficient_lm.interop.io import read_checkpoint, read_safetensors, write_safetensors
from efficient_lm.interop.mapping import CheckpointMismatch, Rule, fill_model
from efficient_lm.interop.rodimus import load_rodimus, rodimus_config, rodimus_from_state_dict, rodimus_rules

__all__ = ["CheckpointMismatch", "Rule", "calibrate_dijiang", "convert_to_dijiang", "fill_model",
           "fla_deltanet_config", "fla_deltanet_from_state_dict", "fla_deltanet_rules", "gpt_neox_config",
           "gpt_neox_from_state_dict", "gpt_neox_rules", "kl_to_teacher", "load_fla_deltanet", "load_gpt_neox",
           "load_rodimus", "load_safetensors", "make_distill_step", "model_tensors", "read_checkpoint",
           "read_safetensors", "rodimus_config", "rodimus_from_state_dict", "rodimus_rules", "save_safetensors",
           "transfer_attention", "with_teacher_logits", "write_safetensors"]
