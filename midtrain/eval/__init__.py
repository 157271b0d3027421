"""Evaluation and analysis: validation losses, corpus similarity, data-efficiency fits."""
