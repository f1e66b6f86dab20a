"""The front door: `import lora_lens as ll` is cheap, and every name it offers resolves to its home."""

from __future__ import annotations

import importlib
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


def test_every_module_declares_all():
    import pkgutil

    names = [m.name for m in pkgutil.walk_packages(ll.__path__, "lora_lens.")]
    assert len(names) > 40
    for name in names:
        assert isinstance(getattr(importlib.import_module(name), "__all__", None), list), f"{name} has no __all__"
