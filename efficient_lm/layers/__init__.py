"""Flax NNX layers: thin modules over pure functions, parameters with logical axis names."""
