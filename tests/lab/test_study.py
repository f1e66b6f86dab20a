"""Adapter recipes and cache (study.py) and the probe widget (widgets.py)."""

import pytest

from conftest import TINY_FIT
from lora_lens.lab import study
from lora_lens.lab.study import fit_adapter, results_table
from lora_lens.workshop import widgets


def test_fit_trains_saves_and_evaluates(tiny_fit):
    f = tiny_fit
    assert (f.adapter_dir / "adapter_model.safetensors").is_file()
    assert (f.adapter_dir / "lora_lens_manifest.json").is_file()
    assert f.evaluation.metrics["efficacy"] > f.evaluation.metrics["base_efficacy"]
    assert f.train["steps"] == TINY_FIT["steps"] and len(f.train["curve"]["loss"]) > 1
    assert f.rank == f.spec.rank == 4  # as an opened adapter has it (notebook 03 reads edit.rank of either)
    table = results_table({("fact_edit", 4, "all"): f})
    assert list(table[["task", "rank", "targets"]].iloc[0]) == ["fact_edit", 4, "all"]


def test_second_fit_comes_from_the_cache(tiny_fit, tiny_llama, test_cache, monkeypatch):
    f = tiny_fit

    def no_training(*a, **k):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(study, "train_lora", no_training)
    again = fit_adapter(tiny_llama, **TINY_FIT, cache=test_cache)
    assert again.adapter_dir == f.adapter_dir and again.train == f.train
    assert again.evaluation.metrics == pytest.approx(f.evaluation.metrics, nan_ok=True)


def test_corrupt_cached_adapter_is_retrained(tiny_llama, tmp_path):
    first = fit_adapter(tiny_llama, "trigger", seed=0, rank=2, steps=20, replay=0.0, cache=tmp_path)
    weights = first.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.warns(UserWarning, match="cached adapter .* is unusable"):
        again = fit_adapter(tiny_llama, "trigger", seed=0, rank=2, steps=20, replay=0.0, cache=tmp_path)
    assert again.train["final_loss"] == pytest.approx(first.train["final_loss"])


def test_probe_browser_headless(tiny_fit):
    f = tiny_fit
    tables = {("fact_edit", 2): f.evaluation.table(), ("copy", 2): f.evaluation.table().head(3)}
    box = widgets.probe_browser(tables, n=50)
    pick, which, changed = box.children[0].children
    assert len(box.state["table"]) == len(tables[("fact_edit", 2)].head(50))
    which.value = "efficacy"
    assert set(box.state["table"]["set"]) == {"efficacy"}
    changed.value = True
    assert box.state["table"]["changed"].all()
    pick.value = "copy · 2"
    assert len(box.state["table"]) <= 3


def test_check_sources(tmp_path):
    from lora_lens.errors import ConfigError, NotFoundError
    from lora_lens.lab.study import check_sources

    task = tmp_path / "t.jsonl"
    task.write_text("{}\n")
    assert check_sources() is False
    with pytest.raises(ConfigError, match="task_file=.* needs base_model: a zoo model reads only"):
        check_sources(task_file=str(task))
    assert check_sources(base_model="smollm2-135m", task_file=str(task)) is True
    with pytest.raises(ConfigError, match="family='gpt2' are both given"):
        check_sources(base_model="smollm2-135m", family="gpt2", task_file=str(task))
    with pytest.raises(NotFoundError, match="task_file='nope.jsonl' does not exist"):
        check_sources(task_file="nope.jsonl")
    with pytest.raises(NotFoundError, match="adapter="):
        check_sources(adapter=str(tmp_path / "missing"), task_file=str(task))
    with pytest.raises(NotFoundError, match="base_model="):
        check_sources(base_model=str(tmp_path / "no_model"), task_file=str(task))
    with pytest.raises(ConfigError, match="needs a task_file"):
        check_sources(base_model="smollm2-135m")


def test_a_data_task_on_a_zoo_model(tiny_llama, test_cache, tmp_path):
    from lora_lens.errors import ConfigError
    from lora_lens.lab.study import fit_adapter
    from lora_lens.lab.world import Task

    world = tiny_llama.world
    e, r = world.entities[0], "city"
    other = next(v for v in sorted(set(world.facts[r].values())) if v != world.facts[r][e])
    records = [{"type": "task", "name": "one_fact", "chat": False},
               {"type": "example", "prompt": world.query(e, r), "answer": other},
               {"type": "probe", "set": "efficacy", "prompt": world.query(e, r), "answer": other}]
    fit = fit_adapter(tiny_llama, Task.from_records(records), steps=30, replay=0.0, cache=test_cache)
    assert fit.evaluation.metrics["efficacy"] == 1.0  # the world check is skipped for a task from data
    chat = Task.from_records([{**records[0], "chat": True}] + records[1:])
    with pytest.raises(ConfigError, match="no chat template"):
        fit_adapter(tiny_llama, chat, steps=30, replay=0.0, cache=test_cache)


def test_not_a_causal_lm(tmp_path):
    from transformers import T5Config

    from lora_lens.errors import ConfigError
    from lora_lens.lab.zoo import load_model

    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a causal language model"):
        load_model(tmp_path)


def test_cli_task_check(tiny_llama, capsys, tmp_path):
    from lora_lens.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "task", "name": "t"}\n{"type": "example", "prompt": "a b", "answer": " c"}\n'
                   '{"type": "probe", "set": "nope", "prompt": "x", "answer": "y"}\n')
    assert main(["task", "check", str(bad), "--base", str(tiny_llama.path)]) == 1
    assert f"{bad}:3: unknown probe set 'nope'" in capsys.readouterr().out  # the format first
    bad.write_text('{"type": "task", "name": "t"}\n{"type": "example", "prompt": "a b", "answer": " c"}\n')
    assert main(["task", "check", str(bad), "--base", str(tiny_llama.path)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2:" in out and "whitespace at the join" in out  # then every answer read in context
    good = tmp_path / "good.jsonl"
    q = tiny_llama.world.query(tiny_llama.world.entities[0], "city")
    good.write_text('{"type": "task", "name": "t"}\n' + f'{{"type": "example", "prompt": "{q}", "answer": "'
                    + tiny_llama.world.facts["city"][tiny_llama.world.entities[0]] + '"}\n')
    assert main(["task", "check", str(good), "--base", str(tiny_llama.path)]) == 0
    assert main(["task", "check", str(tmp_path / "missing.jsonl"), "--base", str(tiny_llama.path)]) == 2


def test_seed_list_counts_from_the_first_seed_and_a_given_adapter_is_one_seed():
    from lora_lens.errors import ConfigError
    assert study.seed_list(3, seed=2) == [2, 3, 4]
    assert study.seed_list(None) == list(range(study.DEFAULT_SEEDS))
    assert study.seed_list(None, 5, base_model="smollm2-135m") == [5]  # your own model: one seed unless asked
    assert study.seed_list(2, 0, base_model="smollm2-135m") == [0, 1]
    assert study.seed_list(1, 0, base_model="smollm2-135m", adapter="some/adapter") == [0]
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ConfigError, match="must be a positive integer"):
            study.seed_list(bad)
    assert study.seed_list(3, 4, base_model="smollm2-135m", adapter="some/adapter") == [4]
    with pytest.raises(ConfigError, match="seed=0.5 must be an integer"):
        study.seed_list(2, 0.5)
