"""Data-parallel training: ``lora-lens train`` and continued pretraining under ``accelerate launch`` with 2 CPU
processes (gloo) give the weights one process gives, and the batch is the global one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_lens.cli import main
from lora_lens.errors import ConfigError
from lora_lens.lab.study import fit_adapter
from lora_lens.lab.train import LoraSpec, train_lora
from lora_lens.lab.world import make_task

# a zoo fact edit trained both ways: 8 steps of a global batch of 6 over its 30 examples (five full batches an
# epoch, reshuffled each epoch), no dropout (its masks would depend on the process)
STEPS, BATCH = 8, 6
SETS = ["--set", f"steps={STEPS}", "--set", f"batch_size={BATCH}", "--set", "rank=4", "--set", "lr=0.003"]


def _task_file(tiny_llama, tmp_path: Path) -> Path:
    path = tmp_path / "fact_edit.jsonl"
    make_task(tiny_llama.world, "fact_edit", seed=0).save(path)
    return path


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_processes_train_the_adapter_one_process_trains(tiny_llama, tmp_path):
    task = _task_file(tiny_llama, tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(tiny_llama.path), str(task), "--out", str(one), *SETS]) == 0
    done = _launch(["-m", "lora_lens.cli", "train", str(tiny_llama.path), str(task), "--out", str(two), *SETS], 2)
    assert done.stdout.count("wrote ") == 1  # only the main process writes
    record = json.loads((two / "lora_lens_train.json").read_text())
    assert record["steps"] == STEPS and record["examples"] == json.loads((one / "lora_lens_train.json").read_text())[
        "examples"]
    assert record["examples"] % BATCH == 0  # full batches only: see train_adapter on an epoch's last, shorter batch
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys() and len(a) > 0
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    # the same batches and steps; only the order of the gradient all-reduce's float sums differs
    assert moved <= 1e-4 * scale, f"2-process adapter differs from 1-process by {moved:.2e} (scale {scale:.2e})"
    # and it learnt something: not the initial B = 0
    assert scale > 1e-3


CONTINUED = """
import sys
import torch
from lora_lens.lab import parallel
from lora_lens.lab.world import World
from lora_lens.lab.zoo import load_model
from lora_lens.studies.distill import continue_pretraining
model, tok = load_model(sys.argv[1])
reference, _ = load_model(sys.argv[1])
corpus = World.load(sys.argv[1] + "/world.jsonl").corpus()
record = continue_pretraining(model, tok, corpus[:40], corpus[40:80], replay=0.5, steps=6, batch_size=9, lr=1e-3,
                              replay_loss=sys.argv[3], reference=reference)
if parallel.is_main_process():
    torch.save({"state": model.state_dict(), "loss": record["loss"], "tokens": record["tokens"]}, sys.argv[2])
"""


def _launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run((launch if processes > 1 else [sys.executable]) + args, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_continue_pretraining_as_one_does(tiny_llama, tmp_path, replay_loss="kl"):
    script = tmp_path / "continued.py"
    script.write_text(CONTINUED)
    for n in (1, 2):  # 9 lines a step (5 learnt by their tokens, 4 by their KL): 5 and 4 rows per process
        _launch([str(script), str(tiny_llama.path), str(tmp_path / f"{n}.pt"), replay_loss], n)
    one, two = (torch.load(tmp_path / f"{n}.pt") for n in (1, 2))
    assert one["tokens"] == two["tokens"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-5)
    before = load_file(str(Path(tiny_llama.path) / "model.safetensors"))
    moved = max(float((one["state"][k] - before[k]).abs().max()) for k in before if k in one["state"])
    diff = max(float((one["state"][k] - two["state"][k]).abs().max()) for k in one["state"])
    assert moved > 1e-4  # it trained
    assert diff <= 1e-3 * moved, f"2-process weights differ from 1-process by {diff:.2e} (update {moved:.2e})"


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_llama, fresh_tiny, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    model, tok = fresh_tiny()
    task = make_task(tiny_llama.world, "fact_edit", seed=0)
    with pytest.raises(ConfigError, match=r"batch_size=8 does not split over 3 processes.*multiple of 3 \(e\.g\. 6\)"):
        train_lora(model, tok, task, LoraSpec(rank=4, steps=2, batch_size=8))
    assert not any("lora" in n for n, _ in model.named_parameters())  # the model is the base again
    with pytest.raises(ConfigError, match="fit_adapter runs in one process"):
        fit_adapter(tiny_llama, "fact_edit", rank=4, steps=2)


def test_train_command_refuses_a_folder_with_other_content(tiny_llama, tmp_path, capsys):
    task = _task_file(tiny_llama, tmp_path)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", str(tiny_llama.path), str(task), "--out", str(out), *SETS]) == 2
    assert "is a non-empty folder that is not an adapter" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["train", str(tiny_llama.path), str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_train_command_writes_an_adapter_folder_that_loads(tiny_llama, fresh_tiny, tmp_path):
    from lora_lens.lab.adapters import load_adapter

    out = tmp_path / "adapter"
    assert main(["train", str(tiny_llama.path), str(_task_file(tiny_llama, tmp_path)), "--out", str(out), *SETS]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "task.jsonl", "lora_lens_train.json"} <= {
        p.name for p in out.iterdir()}
    model, _ = fresh_tiny()
    peft_model = load_adapter(model, out)
    assert sum(float(p.abs().sum()) for n, p in peft_model.named_parameters() if "lora_B" in n) > 0
    assert torch.isfinite(torch.stack([p.abs().max() for p in peft_model.parameters()])).all()


def test_outside_a_launch_sharing_is_the_identity_and_a_launch_builds_no_zoo_model(tiny_world, tmp_path,
                                                                                    monkeypatch):
    from lora_lens.lab import parallel
    from lora_lens.lab.zoo import get_pretrained

    assert (parallel.processes(), parallel.rank(), parallel.is_main_process()) == (1, 0, True)
    assert parallel.share([3, 1, 2]) == [3, 1, 2] and float(parallel.total(torch.tensor(2.5))) == 2.5
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert parallel.share(list(range(7))) == [1, 3, 5] and not parallel.is_main_process()
    with pytest.raises(ConfigError, match="build it once in one process"):
        get_pretrained("llama", "tiny", world=tiny_world, cache=tmp_path)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
