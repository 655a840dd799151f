"""Training: the model, the linear probe, the phases, checkpoints, calibration and serving signatures."""
