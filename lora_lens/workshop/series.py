"""The notebook series: which notebooks it holds, what each declares and needs, and the parameters each one gets.

The series is every ``notebooks/NN_*.ipynb``, ordered by its two-digit prefix ``NN``. Each notebook declares its
parameters in the cell tagged ``parameters`` (papermill), ``output_dir`` among them (set by the runner).

Parameters come from three layers, later ones winning: the notebook's own defaults, the preset
(:mod:`lora_lens.workshop.presets`), and explicit overrides (``NAME`` for every notebook that declares it,
``NN.NAME`` for notebook ``NN`` only); a preset's zoo ``family``/``families`` gives way when an override names
your own ``base_model``/``base_models`` (:data:`ZOO_CHOICES`). Every name is checked against the parameters the
notebooks declare before anything runs (:func:`plan`). A notebook runs in its own output folder, so :func:`plan`
makes the paths a user names relative to where they run ``lora-lens run`` absolute (:data:`FILE_PARAMETERS`,
:data:`MODEL_PARAMETERS`).

A notebook may declare what it needs in its notebook metadata, ``{"lora_lens": {"needs": ["00"]}}`` (prefixes) or
``{"lora_lens": {"needs": "all"}}`` (every selected notebook with a lower prefix; the journal declares this, so it
runs last). Without a declaration, a notebook needs ``00`` (which pretrains the models the others load from the
shared cache) and ``00`` needs nothing. Needs are about scheduling only: a need that is not selected is ignored,
because every notebook can build what it lacks through the (locked) cache (:func:`dependencies`).

This module stays light (no papermill until a notebook's parameters are read, no torch): ``lora-lens run`` and its
worker processes import it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import nbformat

from lora_lens.errors import ConfigError, NotebookError, NotFoundError
from lora_lens.workshop import presets

__all__ = ["FILE_PARAMETERS", "MODEL_PARAMETERS", "RESERVED", "ZOO_CHOICES", "Notebook", "absolute_paths",
           "declared_needs", "declared_parameters", "default_notebooks_dir", "dependencies", "discover", "inputs_hash",
           "parse_assignments", "parse_value", "plan", "select"]

RESERVED = "output_dir"
"""The parameter every notebook declares and the runner sets: the notebook's own output folder."""
FILE_PARAMETERS = ("task_file", "adapter", "ledger_path")
"""Parameters that name a file or folder: a relative value is taken from the caller's working directory."""
MODEL_PARAMETERS = ("base_model", "cross_base_model", "base_models")
"""Parameters that name a model (a hub name, a local folder, or a list of them): a relative value that exists as a
path from the caller's working directory becomes that absolute path; anything else (a hub name) is kept."""
ZOO_CHOICES = {"base_model": "family", "base_models": "families"}
"""A model parameter and the zoo parameter it replaces: a preset's zoo choice gives way to your own model."""
_NOTEBOOK_RE = re.compile(r"^(\d{2})_.+\.ipynb$")
_KEY_RE = re.compile(r"^(?:(\d{2})\.)?([A-Za-z_]\w*)$")


@dataclass
class Notebook:
    """One notebook of the series and the parameters its ``parameters`` cell declares."""

    prefix: str
    path: Path
    declared: dict[str, dict[str, Any]]
    needs: list[str] | str | None = field(default=None)

    @property
    def stem(self) -> str:
        """The file name without ``.ipynb``, also the name of its output folder."""
        return self.path.stem


def default_notebooks_dir() -> Path:
    """Return the ``notebooks/`` folder next to the package source, else ``./notebooks``.

    Raises:
        NotFoundError: if neither folder exists.
    """
    candidates = [Path(__file__).resolve().parents[2] / "notebooks", Path.cwd() / "notebooks"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise NotFoundError(
        f"no notebooks folder found (looked in {', '.join(str(c) for c in candidates)}); "
        "pass the folder with --notebooks DIR"
    )


def discover(notebooks_dir: Path) -> list[Path]:
    """Return the series ``NN_*.ipynb`` in ``notebooks_dir``, sorted by prefix.

    Raises:
        NotFoundError: if the folder does not exist or holds no ``NN_*.ipynb``.
        ConfigError: if two notebooks share a prefix.
    """
    if not notebooks_dir.is_dir():
        raise NotFoundError(f"notebooks folder {notebooks_dir} does not exist; pass an existing folder")
    paths = sorted(p for p in notebooks_dir.iterdir() if _NOTEBOOK_RE.match(p.name))
    if not paths:
        raise NotFoundError(f"no NN_*.ipynb notebooks in {notebooks_dir}")
    prefixes = [p.name[:2] for p in paths]
    duplicates = sorted({x for x in prefixes if prefixes.count(x) > 1})
    if duplicates:
        raise ConfigError(f"notebook prefixes must be unique; {', '.join(duplicates)} used twice in {notebooks_dir}")
    return paths


def declared_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """Return the parameters declared by the notebook's cell tagged ``parameters``.

    Raises:
        NotebookError: if no cell is tagged ``parameters`` or ``output_dir`` is not declared.
    """
    import papermill  # heavy (imports nbconvert): only once a notebook's parameters are read, not at import

    nb = nbformat.read(path, as_version=4)
    if not any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells):
        raise NotebookError(
            f"notebook {path.name} has no cell tagged 'parameters'; tag the cell holding its parameters "
            "(cell toolbar -> Tags -> parameters)"
        )
    declared = papermill.inspect_notebook(str(path))
    if RESERVED not in declared:
        raise NotebookError(f"notebook {path.name} must declare `{RESERVED}: str = ...` in its parameters cell")
    return declared


def declared_needs(path: Path) -> list[str] | str | None:
    """Return what the notebook declares it needs: ``metadata.lora_lens.needs`` (None when not declared).

    Raises:
        NotebookError: if the declaration is not ``"all"`` or a list of two-digit prefixes.
    """
    meta = nbformat.read(path, as_version=4).metadata.get("lora_lens", {})
    needs = meta.get("needs") if isinstance(meta, dict) else None
    if needs is None or needs == "all":
        return needs
    if isinstance(needs, list) and all(isinstance(x, str) and re.fullmatch(r"\d{2}", x) for x in needs):
        return list(needs)
    raise NotebookError(
        f"notebook {path.name}: metadata lora_lens.needs = {needs!r}; use \"all\" or a list of two-digit "
        'prefixes such as ["00", "01"]'
    )


def dependencies(notebooks: list[Notebook], available: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Resolve what each selected notebook waits for (see the module docstring for the rule).

    Args:
        notebooks: the selected notebooks.
        available: every prefix in the notebooks folder (a need outside it is an error); default: the selected.

    Returns:
        prefix -> prefixes (selected ones only) that must finish ``ok`` before it starts.

    Raises:
        ConfigError: a need names a prefix that is not in the folder, or the needs form a cycle.
    """
    selected = [nb.prefix for nb in notebooks]
    known = set(available if available is not None else selected)
    deps: dict[str, list[str]] = {}
    for nb in notebooks:
        if nb.needs == "all":
            wanted = [p for p in selected if p < nb.prefix]
        elif nb.needs is None:
            wanted = ["00"] if nb.prefix != "00" else []
        else:
            missing = [p for p in nb.needs if p not in known]
            if missing:
                raise ConfigError(
                    f"notebook {nb.stem} needs {', '.join(missing)}, which is not in the notebooks folder; "
                    f"fix metadata lora_lens.needs (available: {', '.join(sorted(known))})"
                )
            wanted = list(nb.needs)
        deps[nb.prefix] = [p for p in wanted if p in selected and p != nb.prefix]
    done: set[str] = set()
    while len(done) < len(deps):
        ready = [p for p in deps if p not in done and all(d in done for d in deps[p])]
        if not ready:
            cycle = ", ".join(f"{p} needs {','.join(deps[p])}" for p in deps if p not in done)
            raise ConfigError(f"notebook needs form a cycle ({cycle}); fix metadata lora_lens.needs")
        done.update(ready)
    return deps


def inputs_hash(path: Path, params: Mapping[str, Any]) -> str:
    """A short hash of what determines a notebook's result here: its file's bytes and its parameters."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    blob = json.dumps({"notebook": digest, "parameters": params}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_value(text: str) -> Any:
    """Parse a command-line value as a Python literal, falling back to the raw string.

    Example:
        >>> parse_value("[1, 2]"), parse_value("0.5"), parse_value("tiny")
        ([1, 2], 0.5, 'tiny')
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["NAME=VALUE", "01.NAME=VALUE"]`` into an overrides dict.

    Raises:
        ConfigError: if an item has no ``=``.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-p expects NAME=VALUE or NN.NAME=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(value)
    return overrides


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as JSON-like data (tuples become lists) or raise ConfigError."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise ConfigError(f"{where}: value {value!r} is not a string, number, bool, None, list or dict")


def absolute_paths(params: Mapping[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """``params`` with the relative paths of :data:`FILE_PARAMETERS` and :data:`MODEL_PARAMETERS` made absolute
    against ``cwd`` (default: the working directory), since each notebook runs in its own output folder.

    Example:
        >>> absolute_paths({"task_file": "t.jsonl", "base_model": "org/name", "seed": 0}, Path("/data"))
        {'task_file': '/data/t.jsonl', 'base_model': 'org/name', 'seed': 0}
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)

    def model(value):
        if isinstance(value, list):
            return [model(v) for v in value]
        if isinstance(value, str) and value and not Path(value).is_absolute() and (cwd / value).exists():
            return str(cwd / value)
        return value

    out = dict(params)
    for name, value in params.items():
        if name in FILE_PARAMETERS and isinstance(value, str) and value and not Path(value).is_absolute():
            out[name] = str(cwd / value)
        elif name in MODEL_PARAMETERS:
            out[name] = model(value)
    return out


def _allowed(notebooks: list[Notebook]) -> str:
    lines = []
    for nb in notebooks:
        names = ", ".join(n for n in nb.declared if n != RESERVED) or "-"
        lines.append(f"  {nb.prefix} ({nb.stem}): {names}")
    return "allowed names per notebook:\n" + "\n".join(lines)


def plan(
    notebooks: list[Notebook], preset: str, overrides: Mapping[str, Any]
) -> list[tuple[Notebook, dict[str, Any]]]:
    """Resolve the parameters for each notebook, checking every name first.

    Returns:
        ``(notebook, parameters)`` pairs, relative paths made absolute (:func:`absolute_paths`); ``output_dir`` is
        added later by :func:`run_series`.

    Raises:
        ConfigError: unknown preset, stale preset name, unknown or malformed override name, bad value.
    """
    if preset not in presets.PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(presets.PRESETS))}")
    table = presets.PRESETS[preset]
    by_prefix = {nb.prefix: nb for nb in notebooks}
    resolved: dict[str, dict[str, Any]] = {nb.prefix: {} for nb in notebooks}
    for nb in notebooks:
        for name, value in table.get(nb.prefix, {}).items():
            if name not in nb.declared or name == RESERVED:
                raise ConfigError(
                    f"preset {preset!r} sets {name!r} for notebook {nb.stem}, which does not declare it; "
                    f"fix lora_lens/workshop/presets.py\n{_allowed([nb])}"
                )
            resolved[nb.prefix][name] = _plain(value, f"preset {preset!r} {nb.prefix}.{name}")
    from_preset = {prefix: set(values) for prefix, values in resolved.items()}
    # plain names first, then NN.NAME so that the targeted value wins
    for key in sorted(overrides, key=lambda k: "." in k):
        match = _KEY_RE.match(key)
        if not match:
            raise ConfigError(f"bad parameter name {key!r}; use NAME or NN.NAME (NN = notebook prefix)")
        prefix, name = match.groups()
        if name == RESERVED:
            raise ConfigError(f"{RESERVED} is set by the runner; choose the run folder with --out instead")
        value = _plain(overrides[key], f"-p {key}")
        if prefix is not None:
            nb = by_prefix.get(prefix)
            if nb is None:
                raise ConfigError(
                    f"-p {key}: notebook {prefix} is not selected; selected: {', '.join(by_prefix)}"
                )
            if name not in nb.declared:
                raise ConfigError(f"-p {key}: notebook {nb.stem} does not declare {name!r}\n{_allowed([nb])}")
            resolved[prefix][name] = value
        else:
            targets = [nb for nb in notebooks if name in nb.declared]
            if not targets:
                raise ConfigError(f"-p {key}: no selected notebook declares {name!r}\n{_allowed(notebooks)}")
            for nb in targets:
                resolved[nb.prefix][name] = value
        for nb in ([by_prefix[prefix]] if prefix is not None else notebooks):
            from_preset[nb.prefix].discard(name)
    for nb in notebooks:  # your own model: the preset's zoo family (a size preset for the zoo) does not apply
        params = resolved[nb.prefix]
        for model, zoo in ZOO_CHOICES.items():
            if params.get(model) and zoo in from_preset[nb.prefix]:
                del params[zoo]
    return [(nb, absolute_paths(resolved[nb.prefix])) for nb in notebooks]


def select(paths: list[Path], only: Iterable[str | int] | None) -> list[Path]:
    """The notebooks of ``paths`` whose prefixes are in ``only`` (all when None), in series order.

    Raises:
        ConfigError: a prefix of ``only`` is not in ``paths``, or ``only`` is empty.
    """
    if only is None:
        return paths
    available = {p.name[:2]: p for p in paths}
    wanted = [str(x).strip().zfill(2) for x in only if str(x).strip()]
    unknown = [x for x in wanted if x not in available]
    if unknown or not wanted:
        raise ConfigError(
            f"--only {','.join(unknown) or '(empty)'}: no such notebook; available: {', '.join(available)}"
        )
    return [p for p in paths if p.name[:2] in wanted]
