"""This process's place in a torchrun/accelerate launch: who speaks, who decides, when to part."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list


def quiet_accelerator_detection() -> None:
    """accelerate imports DeepSpeed (when installed) to unwrap models, and DeepSpeed then warns on
    every CPU-only run that it found no GPU. Say up front that the accelerator is the CPU, which
    is what it would pick, so runs that never use DeepSpeed print nothing about it."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def process_state() -> PartialState:
    """This process's place in a torchrun/accelerate launch (one process otherwise). On a
    CPU-only machine accelerate needs cpu=True to form a gloo process group."""
    return PartialState(cpu=not torch.cuda.is_available())


def decided_by_rank0(decide: Callable[[], Any]) -> Any:
    """Rank 0 calls `decide` and every process of a torchrun/accelerate launch gets its answer
    (one process: just the answer)."""
    state = process_state()
    found = [decide() if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(found)
    return found[0]


def leave_process_group() -> None:
    """Every rank leaves together once the adapter is saved: rank 0 then evaluates alone, and the
    others exit without tearing down a process group rank 0 still holds."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
