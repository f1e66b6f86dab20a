"""Tests of the ledger's figures."""

import matplotlib
import pytest

from ledger_cases import clean_env, db, fill  # noqa: F401 (fixtures)
from lora_lens import ledger
from lora_lens.errors import NotFoundError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend)


def test_plots_return_figures(db):
    assert plot_ok(ledger.plot_timeline(path=db))  # no ledger: a figure saying so
    with pytest.raises(NotFoundError):
        ledger.plot_evidence("acc-high", path=db)
    fill(db)
    fig = ledger.plot_evidence("acc-high", path=db)
    assert fig.axes[0].get_title() == "acc-high: supported" and fig.axes[0].get_ylabel() == "accuracy"
    assert plot_ok(fig) and plot_ok(ledger.plot_timeline(path=db))
    _, ax = plt.subplots()
    assert ledger.plot_evidence("kl-small", ax=ax, path=db) is ax.figure
    assert ledger.plot_timeline(ax=ax, path=db) is ax.figure
    plt.close("all")


def test_figures_leave_the_global_style_alone(db):
    fill(db)
    before = dict(plt.rcParams)
    plt.close(ledger.plot_evidence("acc-high", path=db))
    plt.close(ledger.plot_timeline(path=db))
    assert dict(plt.rcParams) == before


def plot_ok(fig):
    fig.canvas.draw()
    return len(fig.axes) >= 1
