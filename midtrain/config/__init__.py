"""Configuration: the command configs and their sections, the checks run when a config is built, the YAML key
check before jsonargparse, and litgpt's field names.

* ``commands``: ``PretrainConfig`` / ``FinetuneConfig``, one object per command, validated when built.
* ``sections``: the ``train:`` and ``eval:`` sections (``TrainArgs``, ``EvalArgs``).
* ``checks``: every check a run would trip over (also ``midtrain inspect``'s dry run), and the world-size rule.
* ``yaml_check``: a YAML config's keys and values against a command's options, in one-line errors.
* ``litgpt_names``: litgpt's field names translated or refused.
"""
