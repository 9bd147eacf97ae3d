"""Data-parallel training across the processes ``torchrun`` starts (StyleGAN3's way, no DDP).

``DistributedDataParallel`` syncs gradients through hooks on the backward pass of the loss,
which a penalty built from ``autograd.grad`` (R1) bypasses (docs/design.md section 8). Instead,
every rank starts from rank 0's parameters, computes gradients on its share of the global
batch, and ``finish_gradients`` all-reduces one flattened buffer per model and divides it by
the world size. Ranks then hold the gradient of the global-batch mean and take identical
optimizer steps.

NCCL is used for CUDA devices, gloo for CPU. A rank that fails while setting up makes every
rank stop with a message naming it (``agree_setup``); one that fails later stops with a
message naming itself, and ``torchrun`` tears the others down (a collective they are waiting
in fails, or times out after ``timeout_s``).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size``, and its device."""
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0, the only rank that writes outputs."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``'auto'`` (CUDA if available, else CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'``; a bare
    ``'cuda'`` picks GPU ``local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device: cannot parse {name!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def init_from_env(device: str = "auto", timeout_s: float = 600.0) -> Context:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``); a single process when ``WORLD_SIZE`` is unset
    or 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(0, 1, resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Context(rank, world_size, dev)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the number of processes (``(0, 1)`` without a process group)."""
    world_size = _world_size()
    return (dist.get_rank() if world_size > 1 else 0), world_size


def gather_objects(obj) -> list:
    """Collective: every rank's ``obj`` (picklable), in rank order, on every rank."""
    if _world_size() == 1:
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def agree_setup(error: BaseException | None) -> None:
    """Collective: every rank reports whether its setup failed; if any did, every rank raises
    (the failing ranks their own error, the others a ``RuntimeError`` naming them)."""
    if _world_size() == 1:
        if error is not None:
            raise error
        return
    reports = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [f"rank {r} failed during setup: {msg}" for r, msg in enumerate(reports) if msg]
    if failed:
        raise RuntimeError("stopping because " + "; ".join(failed))


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if _world_size() == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t, src=0)


def sum_over_ranks(*tensors: torch.Tensor) -> None:
    """Collective: replace each tensor (on this rank's device) by its sum over all ranks."""
    if _world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: copy rank 0's ``tensor`` (on this rank's device) into every rank's; returns
    it."""
    if _world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def gather_interleaved(rows: torch.Tensor, total: int) -> torch.Tensor | None:
    """Collective: rank ``r`` of ``W`` holds rows ``r, r + W, r + 2W, ...`` of a ``[total,
    ...]`` tensor (on its device); rank 0 gets the whole tensor in order, the others ``None``.
    With one process, ``rows`` itself."""
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return rows
    padded = rows.new_zeros((-(-total // world_size), *rows.shape[1:]))
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size)] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if rank != 0:
        return None
    whole = rows.new_empty((total, *rows.shape[1:]))
    for r, part in enumerate(parts):
        whole[r::world_size] = part[:len(range(r, total, world_size))]
    return whole


def finish_gradients(module: torch.nn.Module) -> None:
    """Make the gradients of ``module``'s parameters ready for the optimizer step: averaged
    over ranks (one all-reduce of a flat buffer) and with ``nan -> 0``, ``+-inf -> +-1e5``
    (StyleGAN2-ADA). Parameters without a gradient (unused by this phase's loss, on every
    rank alike) are left without one, so the optimizer skips them as it would in one
    process."""
    params = [p for p in module.parameters() if p.grad is not None]
    world_size = _world_size()
    if world_size == 1:
        for p in params:
            p.grad.nan_to_num_(nan=0.0, posinf=1e5, neginf=-1e5)
        return
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat.div_(world_size).nan_to_num_(nan=0.0, posinf=1e5, neginf=-1e5)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def check_in_sync(modules: dict) -> None:
    """Collective: raise ``RuntimeError`` if any rank's parameters of ``modules`` (name ->
    module) differ from rank 0's. Compares each parameter's sum and sum of squares exactly:
    ranks that take identical steps hold bitwise identical parameters."""
    if _world_size() == 1:
        return
    sums = [torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
            for m in modules.values() for p in m.parameters()]
    mine = torch.cat(sums)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    diverged = [r for r, theirs in enumerate(gathered) if not torch.equal(theirs, gathered[0])]
    if diverged:
        raise RuntimeError(f"the parameters of {sorted(modules)} on rank(s) {diverged} differ "
                           "from rank 0's: the data-parallel run has diverged")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
