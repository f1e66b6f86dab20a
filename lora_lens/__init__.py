"""lora_lens: what a LoRA adapter really does to a causal language model."""

from lora_lens.errors import (
    ConfigError,
    CorruptError,
    LoraLensError,
    MismatchError,
    NotebookError,
    NotFoundError,
    TrainingError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CorruptError",
    "LoraLensError",
    "MismatchError",
    "NotebookError",
    "NotFoundError",
    "TrainingError",
    "__version__",
]
