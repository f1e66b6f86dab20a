"""The widgets of notebooks 02, 04, 05 and 06, driven headless by setting ``.value`` (no kernel, no model)."""

from __future__ import annotations

import matplotlib
import pandas as pd
import pytest

from lora_lens.workshop import widgets

matplotlib.use("Agg")


@pytest.fixture
def summ_and_dirs():
    summ = pd.DataFrame([
        {"module": "model.layers.1.mlp.down_proj", "energy": 4.0, "energy_share": 0.8, "effective_rank": 1.5,
         "stable_rank": 1.1, "singular_values": [2.0, 0.3]},
        {"module": "model.layers.0.self_attn.q_proj", "energy": 1.0, "energy_share": 0.2, "effective_rank": 1.9,
         "stable_rank": 1.6, "singular_values": [1.0, 0.5]},
    ])
    dirs = pd.DataFrame([{"module": "model.layers.1.mlp.down_proj", "direction": 0, "sign": "+", "rank": i,
                          "token": tok} for i, tok in enumerate(["Kozadun", "Paris", "red"])])
    return summ, dirs


def test_module_explorer(summ_and_dirs):
    summ, dirs = summ_and_dirs
    box = widgets.module_explorer(summ, dirs, top=2)
    assert box.state["module"] == "model.layers.1.mlp.down_proj"  # the largest update first
    assert box.state["singular_values"] == [2.0, 0.3] and box.state["words"]["tokens"].tolist() == ["Kozadun Paris"]
    box.children[0].value = "model.layers.0.self_attn.q_proj"
    assert box.state["effective_rank"] == 1.9 and box.state["words"].empty
    fig = widgets.module_figure(widgets.module_view(summ, dirs, "model.layers.1.mlp.down_proj"))
    assert len(fig.axes[0].patches) == 2


def test_replay_slider():
    sweep = pd.DataFrame({"replay": [0.0, 0.5], "transfer_rate": [1.0, 0.9], "paraphrase_transfer": [0.5, 0.6],
                          "specificity_drop": [0.2, 0.01], "perplexity_ratio": [1.3, 1.02]})
    box = widgets.replay_slider(sweep)
    assert box.state == {"replay": 0.0, "transfer_rate": 1.0, "paraphrase_transfer": 0.5, "specificity_drop": 0.2,
                         "perplexity_ratio": 1.3}
    box.children[0].value = 0.5
    assert box.state["specificity_drop"] == 0.01 and box.state["transfer_rate"] == 0.9
    assert widgets.replay_figure(sweep, 0.5).axes[0].get_title() == "replay 0.5"


class FakeLoop:
    def __init__(self, strategy, efficacies, layers):
        self.strategy, self.efficacies, self.layers = strategy, efficacies, layers

    def table(self):
        return pd.DataFrame([{"strategy": self.strategy, "round": i, "tokens": 100 * (i + 1), "efficacy": e}
                             for i, e in enumerate(self.efficacies)])


def test_round_slider():
    loop = FakeLoop("targeted", [0.4, 0.8, 1.0], [[("p0", "a0")], [("p1", "a1"), ("p2", "a2")], [("p3", "a3")]])
    base = FakeLoop("random", [0.4, 0.5], [[("p0", "a0")], [("q1", "b1")]])
    box = widgets.round_slider([loop, base])
    slider = box.children[0]
    assert slider.max == 2 and box.state["table"]["efficacy"].tolist() == [0.4, 0.4]
    slider.value = 2
    assert box.state["table"]["efficacy"].tolist() == [1.0, 0.5]  # the baseline stopped at round 1
    assert box.state["layer"] == [("p3", "a3")]


def test_pattern_picker():
    table = pd.DataFrame([
        {"pattern": "xf-upper-half", "family": f, "statistic": s, "ci_low": s - 0.1, "ci_high": s + 0.1, "verdict": v}
        for f, s, v in [("llama", 0.7, "holds"), ("gpt2", 0.55, "unclear"), ("all", 0.62, "unclear")]]
        + [{"pattern": "xf-mlp", "family": "all", "statistic": 0.8, "ci_low": 0.7, "ci_high": 0.9,
            "verdict": "universal"}])
    box = widgets.pattern_picker(table)
    fam, pat = box.children[0].children
    assert fam.options[0] == "all" and len(box.state["table"]) == 2
    fam.value = "gpt2"
    assert box.state["table"]["verdict"].tolist() == ["unclear"]
    fam.value, pat.value = "all", "xf-mlp"
    assert box.state["table"]["verdict"].tolist() == ["universal"]
