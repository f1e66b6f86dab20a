"""Tests of the notebook-series runner and the ``lora-lens run`` command, on tiny fixture notebooks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import write_notebook
from lora_lens import cli
from lora_lens.errors import ConfigError, LoraLensError, NotebookError, NotFoundError
from lora_lens.workshop import presets
from lora_lens.workshop.runner import ENV_VARS, NotebookFailed, ledger_name, run_series
from lora_lens.workshop.series import Notebook, declared_parameters, dependencies

RECORD = """\
import json, os, pathlib
ctx = {k: os.environ.get(k) for k in %r}
with open(os.path.join(os.environ["LORA_LENS_RUN_DIR"], "order.txt"), "a") as f:
    f.write(os.environ["LORA_LENS_NOTEBOOK"] + "\\n")
summary = {"x": x, "label": globals().get("label"), "env": ctx, "cwd": os.getcwd()}
pathlib.Path(output_dir, "summary.json").write_text(json.dumps(summary))
""" % (list(ENV_VARS),)


@pytest.fixture(autouse=True)
def _fixture_presets(monkeypatch):
    """Keep the real presets (written for the real notebooks) away from the fixture notebooks."""
    monkeypatch.setattr(presets, "PRESETS", {"workshop": {}, "smoke": {}})


@pytest.fixture
def series(tmp_path: Path) -> Path:
    """Three good notebooks (out of name order on disk does not matter) plus a file that is not in the series."""
    folder = tmp_path / "nbs"
    write_notebook(folder / "02_third.ipynb", [RECORD])
    write_notebook(folder / "00_first.ipynb", [RECORD])
    write_notebook(folder / "01_second.ipynb", [RECORD], parameters='output_dir = "out"\nx = 1\nlabel = "a"')
    write_notebook(folder / "scratch.ipynb", ["raise RuntimeError('not part of the series')"])
    return folder


@pytest.fixture
def failing(tmp_path: Path) -> Path:
    folder = tmp_path / "failing"
    write_notebook(folder / "00_ok.ipynb", ["y = x + 1"])
    write_notebook(folder / "01_fail.ipynb", ["y = 2", "raise ValueError('boom here')\nprint('never')"])
    write_notebook(folder / "02_never.ipynb", ["y = 3"])
    return folder


def summary(run_dir: Path, stem: str) -> dict:
    return json.loads((run_dir / stem / "summary.json").read_text())


# --- executing notebooks -------------------------------------------------------------------------------------


def test_cli_runs_series_in_order_with_overrides_and_context(series, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["run", "--notebooks", str(series), "--out", str(out), "--jobs", "1",
                   "-p", "x=[1, 'a']", "-p", "01.x=5", "-p", "label=hello world"])
    assert rc == 0, capsys.readouterr().err
    stems = ["00_first", "01_second", "02_third"]
    assert (out / "order.txt").read_text().split() == stems
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [*stems, "report"]  # + the run report's files
    assert (out / "index.html").is_file()
    assert json.loads((out / "run.json").read_text())["jobs"] == 1
    for stem in stems:
        assert (out / stem / f"{stem}.ipynb").is_file()  # the executed notebook sits in its output folder

    # literal parsing, plain NAME on every declaring notebook, NN.NAME winning for its notebook
    assert summary(out, "00_first")["x"] == [1, "a"]
    assert summary(out, "01_second")["x"] == 5
    assert summary(out, "02_third")["x"] == [1, "a"]
    assert summary(out, "01_second")["label"] == "hello world"

    # run context seen by the kernel; cwd is the notebook's output folder
    s = summary(out, "01_second")
    assert s["env"]["LORA_LENS_RUN_ID"] == "run"
    assert s["env"]["LORA_LENS_RUN_DIR"] == str(out.resolve())
    assert s["env"]["LORA_LENS_NOTEBOOK"] == "01_second"
    assert json.loads(s["env"]["LORA_LENS_PARAMS"]) == {
        "output_dir": str((out / "01_second").resolve()), "x": 5, "label": "hello world"}
    assert Path(s["cwd"]).resolve() == (out / "01_second").resolve()
    assert s["env"]["LORA_LENS_LEDGER"].endswith("ledger.sqlite")  # the workshop preset's ledger
    for name in ENV_VARS:  # restored in this process
        assert name not in os.environ

    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["preset"] == "workshop"
    assert record["overrides"] == {"x": [1, "a"], "01.x": 5, "label": "hello world"}
    assert [n["notebook"] for n in record["notebooks"]] == stems
    assert all(n["status"] == "ok" and n["seconds"] > 0 for n in record["notebooks"])
    assert record["notebooks"][1]["parameters"]["x"] == 5
    assert not list(out.glob(".*.tmp"))


def test_each_preset_and_base_records_into_its_own_ledger(tmp_path, monkeypatch):
    """A run on another base (your model, another zoo family or size) never pools its evidence with the default's."""
    monkeypatch.delenv("LORA_LENS_LEDGER", raising=False)
    assert ledger_name("workshop", {}) == "ledger.sqlite"
    assert ledger_name("workshop", {"seed": 3, "01.family": "qwen2"}) == "ledger.sqlite"  # not the run's base
    assert ledger_name("smoke", {}) == "ledger-smoke.sqlite"
    assert ledger_name("workshop", {"base_model": "smollm2-135m"}) == "ledger-smollm2-135m.sqlite"
    assert ledger_name("smoke", {"family": "qwen2", "size": "tiny"}) == "ledger-smoke-qwen2-tiny.sqlite"
    assert ledger_name("workshop", {"base_model": "Qwen/Qwen2.5-0.5B"}) == "ledger-qwen-qwen2.5-0.5b.sqlite"
    long = [ledger_name("workshop", {"base_model": f"/data/{who}/experiments/2026/checkpoints/llama-3-8b"})
            for who in ("ana", "bo")]
    assert long[0] != long[1]  # the readable end of two long paths, and a hash of each whole path
    assert all(re.fullmatch(r"ledger-[a-z0-9.-]*checkpoints-llama-3-8b-[0-9a-f]{8}\.sqlite", n) for n in long), long

    folder = tmp_path / "nbs"
    write_notebook(folder / "01_model.ipynb", [RECORD], parameters='output_dir = "out"\nx = 1\nbase_model = ""')
    out = run_series(overrides={"base_model": "smollm2-135m"}, out=tmp_path / "runs" / "r", notebooks_dir=folder,
                     jobs=1)
    want = str(tmp_path / "runs" / "ledger-smollm2-135m.sqlite")
    assert summary(out, "01_model")["env"]["LORA_LENS_LEDGER"] == want
    assert json.loads((out / "run.json").read_text())["ledger"] == want


def test_only_and_default_run_folder(series, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = run_series(only=["02"], notebooks_dir=series)
    assert run_dir.parent == (tmp_path / "runs").resolve()
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["02_third", "report"]
    assert (run_dir / "order.txt").read_text().split() == ["02_third"]


def test_failing_cell_stops_run_and_names_notebook_cell_and_error(failing, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["run", "--notebooks", str(failing), "--out", str(out), "--jobs", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "01_fail" in err and "cell 3" in err and "raise ValueError('boom here')" in err
    assert "ValueError: boom here" in err
    assert "Traceback" not in err
    assert (out / "01_fail" / "01_fail.ipynb").is_file()  # kept for inspection
    assert not (out / "02_never").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed"
    assert [n["status"] for n in record["notebooks"]] == ["ok", "failed", "pending"]
    assert "boom here" in record["notebooks"][1]["error"]


def test_failing_cell_raises_notebook_failed(failing, tmp_path):
    with pytest.raises(NotebookFailed) as info:
        run_series(only=["01"], notebooks_dir=failing, out=tmp_path / "run")
    assert isinstance(info.value, NotebookError) and isinstance(info.value, LoraLensError)
    assert info.value.notebook == "01_fail"
    assert info.value.executed == (tmp_path / "run" / "01_fail" / "01_fail.ipynb").resolve()


# --- refusing bad input before anything runs -----------------------------------------------------------------


def _refused(tmp_path: Path, exc_type, *fragments, **kwargs):
    out = tmp_path / "refused"
    with pytest.raises(exc_type) as info:
        run_series(out=out, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not out.exists()
    return info.value


def test_unknown_name_lists_allowed_names(series, tmp_path):
    _refused(tmp_path, ConfigError, "'nope'", "00 (00_first): x", "01 (01_second): x, label",
             notebooks_dir=series, overrides={"nope": 1})


def test_name_declared_by_unselected_notebook_only(series, tmp_path):
    _refused(tmp_path, ConfigError, "'label'", notebooks_dir=series, only=["00", "02"], overrides={"label": "b"})


def test_targeted_name_must_be_declared_by_that_notebook(series, tmp_path):
    _refused(tmp_path, ConfigError, "00_first", "'label'", notebooks_dir=series, overrides={"00.label": "b"})


def test_targeted_notebook_must_be_selected(series, tmp_path):
    _refused(tmp_path, ConfigError, "01", "not selected", notebooks_dir=series, only=["00"], overrides={"01.x": 2})


def test_output_dir_cannot_be_overridden(series, tmp_path):
    _refused(tmp_path, ConfigError, "--out", notebooks_dir=series, overrides={"output_dir": "elsewhere"})


def test_malformed_name(series, tmp_path):
    _refused(tmp_path, ConfigError, "NN.NAME", notebooks_dir=series, overrides={"1.x": 2})


def test_unknown_preset_lists_presets(series, tmp_path):
    _refused(tmp_path, ConfigError, "'huge'", "smoke", "workshop", notebooks_dir=series, preset="huge")


def test_stale_preset_name(series, tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESETS", {"workshop": {"01": {"label": "b", "lr": 0.1}}})
    _refused(tmp_path, ConfigError, "'lr'", "01_second", "presets.py", notebooks_dir=series)


def test_unknown_only_prefix(series, tmp_path):
    _refused(tmp_path, ConfigError, "07", "00, 01, 02", notebooks_dir=series, only=["07"])


def test_missing_parameters_tag(tmp_path):
    folder = tmp_path / "nbs"
    write_notebook(folder / "00_ok.ipynb", ["pass"])
    write_notebook(folder / "01_untagged.ipynb", ["output_dir = 'out'"], parameters=None)
    err = _refused(tmp_path, NotebookError, "01_untagged.ipynb", "tag", "parameters", notebooks_dir=folder)
    assert not isinstance(err, NotebookFailed)


def test_output_dir_must_be_declared(tmp_path):
    folder = tmp_path / "nbs"
    write_notebook(folder / "00_no_out.ipynb", ["pass"], parameters="x = 1")
    _refused(tmp_path, NotebookError, "output_dir", notebooks_dir=folder)


def test_existing_nonempty_out_is_refused(series, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        run_series(out=out, notebooks_dir=series)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_notebooks_folder(tmp_path):
    _refused(tmp_path, NotFoundError, "nowhere", notebooks_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, NotFoundError, "NN_*.ipynb", notebooks_dir=tmp_path / "empty")


# --- pure helpers --------------------------------------------------------------------------------------------


def test_declared_parameters_reads_the_notebook(series):
    assert set(declared_parameters(series / "01_second.ipynb")) == {"output_dir", "x", "label"}


# --- command line --------------------------------------------------------------------------------------------


def test_cli_config_error_exits_2_without_traceback(series, tmp_path, capsys):
    rc = cli.main(["run", "--notebooks", str(series), "--out", str(tmp_path / "r"), "-p", "nope=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "allowed names" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_cli_only_takes_comma_lists(series, tmp_path, capsys):
    rc = cli.main(["run", "--notebooks", str(series), "--out", str(tmp_path / "r"), "--only", "00,09"])
    assert rc == 2 and "09" in capsys.readouterr().err


def test_cli_unknown_preset_exits_2(series, tmp_path, capsys):
    assert cli.main(["run", "--notebooks", str(series), "--preset", "huge"]) == 2
    assert "huge" in capsys.readouterr().err


def test_cli_version(capsys):
    from lora_lens import __version__
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "run" in capsys.readouterr().err


def test_cli_ledger_forwards_argv(monkeypatch):
    from lora_lens.ledger import command

    seen = []
    monkeypatch.setattr(command, "ledger_main", lambda argv: seen.append(argv) or 3)
    assert cli.main(["ledger", "list", "--all"]) == 3
    assert seen == [["list", "--all"]]


# --- parallel runs, needs, resume, peak RSS ------------------------------------------------------------------

STAMP = """\
import json, os, time, pathlib
t0 = time.time()
time.sleep(wait)
pathlib.Path(output_dir, "summary.json").write_text(json.dumps({"t0": t0, "t1": time.time(), "x": x}))
"""


def _stamped(folder: Path, prefixes: list[str], wait: float = 2.0) -> Path:
    for p in prefixes:
        write_notebook(folder / f"{p}_nb.ipynb", [STAMP], parameters=f'output_dir = "out"\nx = 1\nwait = {wait}')
    return folder


def test_jobs_run_independent_notebooks_at_once_with_own_kernels(tmp_path):
    """00 first (default need), then 01 and 02 at the same time, each in its own kernel (no port clash)."""
    folder = _stamped(tmp_path / "nbs", ["00", "01", "02"])
    run_dir = run_series(notebooks_dir=folder, out=tmp_path / "run", jobs=2)
    s = {p: summary(run_dir, f"{p}_nb") for p in ("00", "01", "02")}
    assert s["01"]["t0"] >= s["00"]["t1"] and s["02"]["t0"] >= s["00"]["t1"]  # both waited for 00
    assert s["01"]["t0"] < s["02"]["t1"] and s["02"]["t0"] < s["01"]["t1"]  # and overlapped
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok" and record["jobs"] == 2
    assert [n["needs"] for n in record["notebooks"]] == [[], ["00"], ["00"]]
    assert all(n["max_rss_mb"] > 10 for n in record["notebooks"])


def test_cli_runs_two_notebooks_at_once_by_default(tmp_path):
    from lora_lens.workshop.runner import DEFAULT_JOBS

    assert DEFAULT_JOBS == min(2, os.cpu_count() or 1)
    folder = _stamped(tmp_path / "nbs", ["00", "01"])
    assert cli.main(["run", "--notebooks", str(folder), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["jobs"] == DEFAULT_JOBS


def test_needs_all_runs_last_and_needs_are_validated(tmp_path):
    folder = _stamped(tmp_path / "nbs", ["00", "01", "02"], wait=0)
    nbs = [Notebook(p, folder / f"{p}_nb.ipynb", {}) for p in ("00", "01", "02")]
    nbs[2].needs = "all"
    assert dependencies(nbs) == {"00": [], "01": ["00"], "02": ["00", "01"]}
    assert dependencies(nbs[1:]) == {"01": [], "02": ["01"]}  # a need that is not selected is ignored
    nbs[0].needs = ["02"]
    with pytest.raises(ConfigError, match="cycle"):
        dependencies(nbs)
    nbs[0].needs = ["09"]
    with pytest.raises(ConfigError, match="09"):
        dependencies(nbs)


def test_needs_declared_in_notebook_metadata(tmp_path):
    import nbformat

    folder = _stamped(tmp_path / "nbs", ["00", "01"], wait=0)
    nb = nbformat.read(folder / "01_nb.ipynb", as_version=4)
    nb.metadata["lora_lens"] = {"needs": "01"}
    nbformat.write(nb, folder / "01_nb.ipynb")
    _refused(tmp_path, NotebookError, "lora_lens.needs", "'01'", notebooks_dir=folder)


def test_peak_rss_of_each_notebook_is_recorded(tmp_path):
    folder = tmp_path / "nbs"
    write_notebook(folder / "00_big.ipynb", [
        "block = bytearray(300 * 2**20)\nblock[::4096] = b'x' * len(block[::4096])"])
    run_dir = run_series(notebooks_dir=folder, out=tmp_path / "run")
    (entry,) = json.loads((run_dir / "run.json").read_text())["notebooks"]
    assert entry["max_rss_mb"] >= 300


def test_resume_skips_done_and_reruns_failed_or_changed(tmp_path):
    folder = tmp_path / "nbs"
    write_notebook(folder / "00_ok.ipynb", [RECORD])
    write_notebook(folder / "01_flaky.ipynb", ["import os\nif not os.path.exists(flag): raise ValueError('no flag')",
                                               RECORD], parameters='output_dir = "out"\nx = 1\nflag = "none"')
    out = tmp_path / "run"
    with pytest.raises(NotebookFailed):
        run_series(notebooks_dir=folder, out=out, preset="smoke")
    flag = tmp_path / "flag"
    flag.write_text("")
    rc = cli.main(["run", "--resume", str(out), "-p", f"flag={flag}"])
    assert rc == 0
    assert (out / "order.txt").read_text().split() == ["00_ok", "01_flaky"]  # 00 not run again
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["preset"] == "smoke"  # the recorded preset is kept
    assert [a["ran"] for a in record["attempts"]] == [["00_ok", "01_flaky"], ["01_flaky"]]
    assert record["attempts"][1]["reused"] == ["00_ok"]
    # a changed parameter reruns its notebook and the notebooks that need it; same parameters again: nothing runs
    assert cli.main(["run", "--resume", str(out), "-p", "01.x=2"]) == 0
    assert (out / "order.txt").read_text().split() == ["00_ok", "01_flaky", "01_flaky"]
    assert cli.main(["run", "--resume", str(out), "-p", "00.x=3"]) == 0
    assert (out / "order.txt").read_text().split() == ["00_ok", "01_flaky", "01_flaky", "00_ok", "01_flaky"]
    run_series(resume=out)
    assert len((out / "order.txt").read_text().split()) == 5
    assert summary(out, "00_ok")["x"] == 3 and summary(out, "01_flaky")["x"] == 2
    assert (out / "index.html").is_file()


def test_bad_jobs_and_resume_are_refused_before_writing(series, tmp_path, capsys):
    for jobs in (0, -1):
        _refused(tmp_path, ConfigError, f"--jobs {jobs}", "≥ 1", notebooks_dir=series, jobs=jobs)
    assert cli.main(["run", "--notebooks", str(series), "--jobs", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--jobs 0" in capsys.readouterr().err and not (tmp_path / "r").exists()
    with pytest.raises(NotFoundError, match="nowhere"):
        run_series(resume=tmp_path / "nowhere", notebooks_dir=series)
    assert not (tmp_path / "nowhere").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(ConfigError, match="not a run folder"):
        run_series(resume=plain, notebooks_dir=series)
    assert list(plain.iterdir()) == []
    with pytest.raises(ConfigError, match="--out"):
        run_series(resume=plain, out=tmp_path / "x", notebooks_dir=series)


def test_a_run_folder_in_use_is_refused(series, tmp_path):
    import fcntl

    run = tmp_path / "busy"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"preset": "workshop", "notebooks": [{"notebook": "00_first"}]}))
    before = (run / "run.json").read_text()
    with open(run / ".run.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="in use by another lora-lens run"):
            run_series(resume=run, notebooks_dir=series)
    assert (run / "run.json").read_text() == before
