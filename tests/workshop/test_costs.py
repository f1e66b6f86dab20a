"""The cost note of a notebook's first cell names the base of every seed it loads, cached or trained now."""

from __future__ import annotations

import subprocess
import sys

from lora_lens.workshop.costs import cost_note


def test_cost_note_names_each_seeds_base(tmp_path):
    one = cost_note("01", families=["llama"], size="tiny", n_entities=24, seed=0, cache=tmp_path)
    assert "Pretrained now (not in the cache): llama, about" in one
    three = cost_note("01", families=["llama"], size="tiny", n_entities=24, seed=0, cache=tmp_path, seeds=[0, 1, 2])
    assert "Pretrained now (not in the cache): llama seed 0, llama seed 1, llama seed 2, about" in three
    assert "From the cache" not in three


def test_the_journal_loads_no_model_and_its_note_no_torch():
    code = ("import sys; from lora_lens.workshop.costs import cost_note; print(cost_note('07')); "
            "print('torch' in sys.modules)")
    note, torch_loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                        check=True).stdout.strip().split("\n")
    assert note.startswith("This notebook loads no model") and torch_loaded == "False"
