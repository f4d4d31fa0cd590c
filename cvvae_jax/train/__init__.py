"""Training: the config's sections, state, objectives, the sharded step, the loop, probe, checkpoints and pods."""
