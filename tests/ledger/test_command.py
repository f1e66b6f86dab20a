"""Tests of the ``lora-lens ledger`` command."""

from ledger_cases import clean_env, db, fill  # noqa: F401 (fixtures)
from lora_lens.ledger.command import ledger_main


def test_cli(db, tmp_path, capsys):
    assert ledger_main(["--ledger", str(db), "list"]) == 0
    assert "no hypotheses" in capsys.readouterr().out
    fill(db)
    assert ledger_main(["list", "--ledger", str(db)]) == 0
    listed = " ".join(capsys.readouterr().out.split())
    assert "mean ci_low ci_high" in listed and "acc-high supported 1 1 0.95 0.95 0.95" in listed
    assert "kl-small supported 3 2 0.3333 0.1 0.7" in listed
    assert ledger_main(["--ledger", str(db), "show", "acc-high"]) == 0
    out = capsys.readouterr().out
    assert "## acc-high: supported" in out and "(evidence #3)" in out
    assert "**Evidence:** mean 0.95, 95% bootstrap interval [0.95, 0.95]" in out and "| threads | machine |" in out
    for fmt in ("md", "html", "jsonl"):
        assert ledger_main(["--ledger", str(db), "export", "--format", fmt, "--out", str(tmp_path / f"l.{fmt}")]) == 0
    assert ledger_main(["--ledger", str(tmp_path / "new.sqlite"), "import", str(tmp_path / "l.jsonl")]) == 0
    assert "imported 2 hypotheses, 6 evidence" in capsys.readouterr().out
    assert ledger_main(["--ledger", str(db), "show", "nope"]) == 2
    assert "unknown hypothesis 'nope'" in capsys.readouterr().err
    assert ledger_main(["--ledger", str(tmp_path / "missing.sqlite"), "export"]) == 2
    assert ledger_main(["frobnicate"]) == 2
    assert ledger_main(["--help"]) == 0
