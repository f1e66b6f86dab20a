"""Tests of the series' figure convention: figures are returned, drawn into given axes, and set no global theme."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend)

from lora_lens.figures import FIGURE_STYLE  # noqa: E402
from lora_lens.workshop import plots  # noqa: E402

CURVES = {"a": {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0]}}


def test_figures_are_styled_without_a_global_theme():
    before = dict(plt.rcParams)
    fig = plots.learning_curves(CURVES)
    edge = fig.axes[0].spines["left"].get_edgecolor()
    assert edge == matplotlib.colors.to_rgba(FIGURE_STYLE["axes.edgecolor"]) != matplotlib.colors.to_rgba("black")
    assert dict(plt.rcParams) == before  # importing and drawing left the user's settings alone
    fig2, axes = plots.subplots(1, 2)
    assert plots.learning_curves(CURVES, ax=axes[1]) is fig2
    assert fig2.axes[1].get_lines()
    plt.close("all")
