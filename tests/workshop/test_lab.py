"""``lora-lens lab``: the JupyterLab command and the environment its kernels get (nothing is started)."""

from __future__ import annotations

import shlex
from pathlib import Path

from lora_lens import cli
from lora_lens.workshop.lab import KERNEL, lab_command, lab_environment

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_command(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORA_LENS_LEDGER", raising=False)
    monkeypatch.setenv("LORA_LENS_RUN_ID", "leftover")
    assert cli.main(["lab", "--dry-run", "--port", "8899", "--no-browser"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    words = shlex.split(line)
    assert words[0] == f"LORA_LENS_CACHE={tmp_path / 'cache'}"
    assert words[1] == f"LORA_LENS_LEDGER={REPO / 'runs' / 'ledger.sqlite'}"  # the ledger of `lora-lens run`
    assert words[3:6] == ["-m", "jupyter", "lab"]
    assert f"--ServerApp.root_dir={REPO / 'notebooks'}" in words
    assert f"--MappingKernelManager.default_kernel_name={KERNEL}" in words
    assert "--port=8899" in words and "--no-browser" in words and words[-1] == "00_world_and_zoo.ipynb"


def test_environment_is_not_a_run_and_keeps_a_set_ledger(tmp_path):
    env = lab_environment(REPO / "notebooks", {"LORA_LENS_LEDGER": str(tmp_path / "l.sqlite"),
                                                "LORA_LENS_RUN_DIR": "/x", "LORA_LENS_PARAMS": "{}"})
    assert env["LORA_LENS_LEDGER"] == str(tmp_path / "l.sqlite")
    assert "LORA_LENS_RUN_DIR" not in env and "LORA_LENS_PARAMS" not in env
    assert Path(env["LORA_LENS_CACHE"]).is_absolute()
    argv, env2 = lab_command(REPO / "notebooks")
    assert "--port" not in " ".join(argv) and env2["LORA_LENS_CACHE"]
