"""lora_lens: what a LoRA adapter really does to a causal language model.

The front door. ``import lora_lens as ll`` gives the entry points a newcomer needs and the analysis namespaces;
everything is loaded on first use, so ``import lora_lens`` itself is cheap (no torch until you ask for a model).

Entry points, in the order of the work:
    ``make_world``, ``make_task``  the synthetic world and a LoRA task with planted truth (``lab.world``)
    ``get_pretrained``             a zoo model pretrained on the world, from the cache (``lab.zoo``)
    ``load_model``                 any Hugging Face causal LM: hub name or local folder (``lab.zoo``)
    ``LoraSpec``, ``default_spec``, ``train_lora``   LoRA training with peft (``lab.train``)
    ``fit_adapter``                train or load from the adapter cache, and evaluate (``lab.study``)
    ``save_adapter``, ``load_adapter``               adapters as plain PEFT folders (``lab.adapters``)
    ``evaluate``                   behaviour base vs adapted on the task's probes (``lab.probes``)
    ``run_series``                 the notebook series, headless (``workshop.runner``)

Namespaces (modules): ``delta``, ``diff``, ``attribution``, ``inspect_adapter`` (the lens); ``distill``,
``curriculum``, ``compare`` (the studies); ``ledger``, ``journal``; ``plots``, ``widgets``, ``exercises``
(the workshop). The rooms themselves are ``lora_lens.lab``, ``.lens``, ``.studies``, ``.ledger``,
``.workshop``; ``docs/architecture.md`` says which room owns what.

Example:
    >>> import lora_lens as ll
    >>> world = ll.make_world(n_entities=20, seed=0)
    >>> ll.make_task(world, "fact_edit", k=2).name
    'fact_edit'
"""

from importlib import import_module

from lora_lens.errors import (ConfigError, CorruptError, LoraLensError, MismatchError, NotebookError, NotFoundError,
                              TrainingError)

__version__ = "0.1.0"

# name -> (module, attribute); attribute None: the module itself is the name.
_ENTRY_POINTS = {
    "make_world": ("lora_lens.lab.world", "make_world"),
    "make_task": ("lora_lens.lab.world", "make_task"),
    "Task": ("lora_lens.lab.world", "Task"),
    "World": ("lora_lens.lab.world", "World"),
    "TASKS": ("lora_lens.lab.world", "TASKS"),
    "FAMILIES": ("lora_lens.lab.zoo", "FAMILIES"),
    "get_pretrained": ("lora_lens.lab.zoo", "get_pretrained"),
    "load_model": ("lora_lens.lab.zoo", "load_model"),
    "LoraSpec": ("lora_lens.lab.train", "LoraSpec"),
    "default_spec": ("lora_lens.lab.train", "default_spec"),
    "train_lora": ("lora_lens.lab.train", "train_lora"),
    "fit_adapter": ("lora_lens.lab.study", "fit_adapter"),
    "results_table": ("lora_lens.lab.study", "results_table"),
    "save_adapter": ("lora_lens.lab.adapters", "save_adapter"),
    "load_adapter": ("lora_lens.lab.adapters", "load_adapter"),
    "evaluate": ("lora_lens.lab.probes", "evaluate"),
    "run_series": ("lora_lens.workshop.runner", "run_series"),
    "write_json": ("lora_lens.utils", "write_json"),
}
_NAMESPACES = {
    "lab": "lora_lens.lab",
    "lens": "lora_lens.lens",
    "studies": "lora_lens.studies",
    "workshop": "lora_lens.workshop",
    "delta": "lora_lens.lens.delta",
    "diff": "lora_lens.lens.diff",
    "attribution": "lora_lens.lens.attribution",
    "inspect_adapter": "lora_lens.lens.inspect_adapter",
    "distill": "lora_lens.studies.distill",
    "curriculum": "lora_lens.studies.curriculum",
    "compare": "lora_lens.studies.compare",
    "ledger": "lora_lens.ledger",
    "journal": "lora_lens.ledger.journal",
    "plots": "lora_lens.workshop.plots",
    "widgets": "lora_lens.workshop.widgets",
    "exercises": "lora_lens.workshop.exercises",
}

__all__ = [
    *_ENTRY_POINTS,
    *_NAMESPACES,
    "ConfigError",
    "CorruptError",
    "LoraLensError",
    "MismatchError",
    "NotebookError",
    "NotFoundError",
    "TrainingError",
    "__version__",
]


def __getattr__(name: str):
    """Load an entry point or namespace on first use (PEP 562) and keep it as a module attribute."""
    if name in _ENTRY_POINTS:
        module, attr = _ENTRY_POINTS[name]
        value = getattr(import_module(module), attr)
    elif name in _NAMESPACES:
        value = import_module(_NAMESPACES[name])
    else:
        raise AttributeError(f"module 'lora_lens' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
