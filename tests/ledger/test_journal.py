"""Tests of the journal helpers behind notebook 07: counts, table, figures and markdown."""

import doctest

import matplotlib
import pytest

from lora_lens import ledger
from lora_lens.errors import ConfigError
from lora_lens.ledger import journal

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend)


pytestmark = pytest.mark.usefixtures("ledger_outside_run")


@pytest.fixture
def db(three_hypotheses):
    return three_hypotheses


def test_empty_ledger_is_all_zeros_and_creates_nothing(tmp_path):
    missing = tmp_path / "none" / "ledger.sqlite"
    assert journal.verdict_counts(missing) == dict(hypotheses=0, supported=0, refuted=0, inconclusive=0, evidence=0,
                                            retracted=0)
    assert journal.status(missing).startswith("**No hypotheses recorded yet**")
    assert journal.verdict_table(missing).data.empty
    assert "No hypotheses recorded yet" in journal.markdown(missing)
    assert journal.plot_evidence_grid(missing).axes
    timeline = ledger.plot_timeline(path=missing)
    assert [t.get_text() for t in timeline.axes[0].texts] == ["no hypotheses declared yet"]
    assert not missing.parent.exists()


def test_counts_table_and_markdown(db):
    assert journal.verdict_counts(db) == dict(hypotheses=3, supported=1, refuted=1, inconclusive=1, evidence=4,
                                       retracted=1)
    assert "3 hypotheses" in journal.status(db) and "1 refuted" in journal.status(db)
    styled = journal.verdict_table(db)
    assert list(styled.data["verdict"]) == ["supported", "refuted", "inconclusive"]
    assert list(styled.data["mean [interval]"]) == ["0.96 [0.95, 0.97]", "0.2 [0.2, 0.2]", "2.5 [2.5, 2.5]"]
    assert "background-color: #f8d0d0" in styled.to_html()  # refuted is coloured
    assert len(journal.verdict_table(db, max_hypotheses=2).data) == 2
    assert journal.markdown(db) == ledger.export("md", db)


def test_resolve_treats_empty_as_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_LENS_LEDGER", str(tmp_path / "x.sqlite"))
    assert journal.resolve("") == tmp_path / "x.sqlite"
    assert journal.resolve("other.sqlite").name == "other.sqlite"


def test_plot_evidence_grid_limits_panels(db):
    fig = journal.plot_evidence_grid(db, max_hypotheses=2)
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["acc-high: supported", "kl-small: refuted"]
    assert fig.get_suptitle() == "first 2 of 3 hypotheses"
    assert len([a for a in journal.plot_evidence_grid(db).axes if a.axison]) == 3
    fig = plt.figure()
    assert journal.plot_evidence_grid(db, fig=fig) is fig
    plt.close("all")
    for bad in (journal.verdict_table, journal.plot_evidence_grid):
        with pytest.raises(ConfigError, match="max_hypotheses=0"):
            bad(db, max_hypotheses=0)


def test_module_docstring_example_runs():
    assert doctest.testmod(journal).failed == 0
