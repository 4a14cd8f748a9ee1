from pallas_kernels.delta_rule.api import delta_rule, delta_rule_step
