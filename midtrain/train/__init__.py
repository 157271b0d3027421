"""Training: step-keyed learning-rate schedules, atomic checkpoints and the pretraining loop."""
