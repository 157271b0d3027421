"""midtrain: midtraining research on top of litgpt (typed token shards, switching mixtures, replay)."""

__version__ = "0.1.0"
