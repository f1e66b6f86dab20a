"""The front door: `import lora_lens as ll` is cheap, and every name it offers resolves to its home."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types

import lora_lens as ll


def test_every_front_door_name_resolves():
    for name in ll.__all__:
        value = getattr(ll, name)
        assert value is not None, name
    assert isinstance(ll.delta, types.ModuleType) and ll.delta.__name__ == "lora_lens.lens.delta"
    assert ll.fit_adapter is importlib.import_module("lora_lens.lab.study").fit_adapter
    assert ll.ledger.declare is importlib.import_module("lora_lens.ledger.api").declare
    assert set(dir(ll)) >= set(ll.__all__)


def test_unknown_name_is_an_attribute_error():
    try:
        ll.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("ll.no_such_thing should raise AttributeError")


def test_import_is_light_and_never_shadows_the_standard_library():
    code = ("import inspect, os, sys, sysconfig, lora_lens; "
            "assert os.path.dirname(inspect.__file__) == sysconfig.get_paths()['stdlib'], inspect.__file__; "
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import lora_lens imported {out.strip()}"


def test_the_ledger_the_journal_and_the_runner_load_no_torch():
    """What needs no model starts without torch: notebook 07's imports, the ledger's command line and the run report
    (these two without seaborn either: the ledger's figures load it when first drawn)."""
    def loaded(imports: str) -> list[str]:
        code = (f"import json, sys; {imports}; print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft', "
                "'seaborn') if m in sys.modules)))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    assert loaded("from lora_lens import exercises, journal, ledger, write_json") == ["seaborn"]  # 07's figures
    assert loaded("import lora_lens.workshop.report, lora_lens.workshop.runner, lora_lens.ledger.command") == []
    assert loaded("from lora_lens import ledger; ledger.plot_timeline") == ["seaborn"]


def test_every_module_declares_all():
    import pkgutil

    names = [m.name for m in pkgutil.walk_packages(ll.__path__, "lora_lens.")]
    assert len(names) > 40
    for name in names:
        assert isinstance(getattr(importlib.import_module(name), "__all__", None), list), f"{name} has no __all__"
