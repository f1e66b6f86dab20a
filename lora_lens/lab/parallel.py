"""Data parallel training: how many processes train together, which one writes, and how they share a step.

``accelerate launch`` and ``torchrun`` start one process per device (or several on one CPU) and set ``$WORLD_SIZE``
and ``$RANK``. LoRA training (:func:`lora_lens.lab.train.train_lora`, a ``transformers.Trainer``) lets accelerate
split each batch; the plain loop of pretraining and continued pretraining
(:class:`lora_lens.lab.lm_training.LMTrainer`) takes its :func:`share` of each batch's lines and sums the
gradients of all processes (:func:`sum_gradients`) before the step, so that every process takes the step one
process would take on the whole batch. Outside a launch everything here is the one-process identity.
"""

from __future__ import annotations

import os

import torch

__all__ = ["is_main_process", "join", "processes", "rank", "share", "sum_gradients", "total"]


def processes() -> int:
    """How many processes train together: ``$WORLD_SIZE`` as set by ``accelerate launch`` and ``torchrun``, else 1."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def rank() -> int:
    """This process's index among them (``$RANK``; 0 outside a launch)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes results: always outside a distributed launch, else only rank 0."""
    return rank() == 0


def join(device) -> None:
    """Join the launch's process group (gloo on CPUs, NCCL on GPUs), once; nothing outside a launch."""
    if processes() > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=torch.device(device).type == "cpu")


def share(rows: list) -> list:
    """This process's rows of a global batch: every ``processes()``-th one, starting at :func:`rank`."""
    return list(rows)[rank()::processes()]


def total(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over all processes (``value`` itself outside a launch)."""
    if processes() == 1:
        return value
    value = value.detach().clone()
    torch.distributed.all_reduce(value)
    return value


def sum_gradients(params) -> None:
    """Replace each parameter's gradient by its sum over all processes (one all-reduce of every gradient)."""
    if processes() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
