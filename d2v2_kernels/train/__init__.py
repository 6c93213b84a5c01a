"""The trainer: config presets, checkpoints, the training loop."""
