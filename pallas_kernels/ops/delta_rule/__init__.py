from pallas_kernels.ops.delta_rule.api import delta_rule, delta_rule_step
