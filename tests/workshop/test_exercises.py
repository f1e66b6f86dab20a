"""Tests of the exercise checks that need no model: the journal's (07) practice ledgers and verdicts."""

import doctest

import pytest

from lora_lens import ledger
from lora_lens.errors import ConfigError
from lora_lens.workshop import exercises

RIGHT = ["inconclusive", "inconclusive", "supported", "refuted", "supported"]


pytestmark = pytest.mark.usefixtures("ledger_outside_run")


@pytest.fixture
def db(three_hypotheses):
    return three_hypotheses


def test_check_verdicts():
    assert exercises.check_verdicts(None).startswith("not attempted")
    assert exercises.check_verdicts(RIGHT).startswith("correct")
    assert exercises.check_verdicts(["yes"] * 5).startswith("not yet")
    wrong = exercises.check_verdicts(RIGHT[:3] + ["supported", "supported"])
    assert wrong.startswith("not yet: 4 of 5 right; look again at step 4")
    assert "refuted" not in wrong  # the hint does not give the answer away


def test_check_own_hypothesis(db):
    assert exercises.check_own_hypothesis(None, db).startswith("not attempted")
    assert "unknown hypothesis" in exercises.check_own_hypothesis("nope", db)
    assert "min_runs=1" in exercises.check_own_hypothesis("kl-small", db)
    assert "another seed" in exercises.check_own_hypothesis("rank-low", db)
    ledger.record("rank-low", 3.0, seed=1, path=db)
    assert "needs 3" in exercises.check_own_hypothesis("rank-low", db)
    ledger.record("rank-low", 3.5, seed=2, path=db)
    assert exercises.check_own_hypothesis("rank-low", db) == ("correct: 'rank-low' is supported on 3 live records "
                                                             "from 3 runs/seeds")
    ledger.declare("vague", "Something changes", "x", ">", 0, min_runs=2, path=db)
    assert "falsifier" in exercises.check_own_hypothesis("vague", db)


def test_practice_ledger_and_retraction(tmp_path, db):
    practice = exercises.practice_ledger(tmp_path / "practice.sqlite")
    assert exercises.check_retraction(practice).startswith("not attempted")
    ev = ledger.evidence("practice-forgetting", path=practice)
    failing = int(ev[~ev["passed"].astype(bool)]["id"].iloc[0])
    ledger.retract(failing, "I do not like it", path=practice)
    assert exercises.check_retraction(practice).startswith("not yet")
    exercises.practice_ledger(practice)  # start over
    assert len(ledger.evidence(path=practice)) == 4
    mistake = int(ev[ev["notes"].str.contains("crashed")]["id"].iloc[0])
    ledger.retract(mistake, "compared against the wrong rank-2 adapter", path=practice)
    assert exercises.check_retraction(practice) == (f"correct: record #{mistake} is retracted and the verdict is now "
                                                  "'refuted' - an honest retraction does not have to rescue a claim")
    with pytest.raises(ConfigError, match="other hypotheses"):
        exercises.practice_ledger(db)
    assert len(ledger.hypotheses(db)) == 3  # the real ledger was left alone


def test_module_docstring_example_runs():
    assert doctest.testmod(exercises).failed == 0
