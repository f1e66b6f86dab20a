"""The substrate: the synthetic world, its tokenizer, the model zoo and any-model loading, LoRA training,
adapters on disk, and behaviour probes (base vs adapted on one model).

Data flows one way through the rooms: ``lab`` (world, models, adapters) → ``lens`` (what changed and why) →
``studies`` (distil back, the loop, across families) → ``ledger`` (hypotheses and verdicts) → ``workshop``
(the notebook series and its report).
"""

__all__ = ["adapters", "answers", "lm_training", "modules", "pair", "probes", "real_models", "study", "task_file",
           "tasks", "tokenizer", "train", "train_data", "world", "zoo"]
