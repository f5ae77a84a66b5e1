"""Several processes, one model: ``torchrun`` detection, the process group, DDP and a few collectives.

Why a module of its own: training and evaluation stay single-process code that asks
:func:`context` once; when it answers ``None`` (no ``torchrun``, or ``--nproc-per-node 1``) nothing here
runs and results are bit-identical to a plain run. Under ``torchrun`` the global batch stays
``batch_size`` images: every rank draws the same global permutation and keeps the slice
``batch[rank::world_size]`` of each batch (as ``DistributedSampler`` would), DDP averages the
gradients, and since every loss term is a mean over equally many vectors per rank, the averaged
gradient is the single-process one. Work that is not split (calibration) is done identically on every
rank; work that is split by whole batches (feature extraction, test images) keeps each batch's
composition, so per-image results are those of a single process.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hgad.device import env_int, env_world_size
from hgad.errors import ConfigError

if TYPE_CHECKING:
    from hgad.model import HGAD

__all__ = ["DistContext", "init", "context", "check_batch_size",
           "rank_slice", "shard_batches", "stage_parameters", "wrap_loss", "all_reduce_mean", "count_true",
           "merge_disjoint_", "all_gather_list", "silent"]

_CHUNK_BYTES = 1 << 28  # cached features cross the wire in 256 MiB pieces (bounded GPU staging memory)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group; ``device`` is where collectives run (CPU for gloo)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def silent(*_args: object) -> None:
    """``print`` / ``log`` of torchrun ranks other than 0: they say nothing."""


def init(device: torch.device) -> DistContext | None:
    """Join the ``torchrun`` process group (NCCL for a CUDA ``device``, gloo for CPU); ``None`` if alone."""
    if env_world_size() <= 1:
        return None
    if not dist.is_available():
        raise ConfigError("torchrun", "this torch build has no torch.distributed support")
    for name in ("RANK", "LOCAL_RANK", "MASTER_PORT"):
        env_int(name)
    if not os.environ.get("MASTER_ADDR"):
        raise ConfigError("MASTER_ADDR", "environment variable missing: launch with torchrun")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_shutdown)
    return context()


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def context() -> DistContext | None:
    """The current process group as a :class:`DistContext`; ``None`` without one or with one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


# ---- data sharding -------------------------------------------------------------------------------
def check_batch_size(batch_size: int, ctx: DistContext | None) -> None:
    """The global batch is split evenly: equal vector counts per rank make DDP's average exact."""
    if ctx is not None and batch_size % ctx.world_size:
        raise ConfigError("--batch-size", f"{batch_size} images per step cannot be split evenly over "
                                          f"{ctx.world_size} processes (use a multiple of {ctx.world_size})")


def rank_slice(batch: Tensor, ctx: DistContext | None) -> Tensor:
    """This rank's images of a global batch: ``batch[rank::world_size]`` (all of it when alone)."""
    return batch if ctx is None else batch[ctx.rank::ctx.world_size]


def shard_batches(n: int, batch_size: int, ctx: DistContext | None) -> list[list[int]]:
    """Consecutive batches of ``range(n)``; batch ``b`` goes to rank ``b % world_size``."""
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    return batches if ctx is None else batches[ctx.rank::ctx.world_size]


# ---- DDP -----------------------------------------------------------------------------------------
def stage_parameters(model: HGAD, stage: int) -> list[nn.Parameter]:
    """The trainable parameters that ``model.loss(..., stage)`` reaches.

    Stage 1, or a prior without intra-class centres, leaves the intra-class parameters without a
    gradient; naming exactly the used ones spares DDP's per-step search for unused parameters and
    keeps their gradients ``None`` (so Adam leaves them and their step counts alone, as when alone).
    """
    params = [p for group in model.param_groups(0.0) for p in group["params"]]
    if model.priors is not None and not (stage == 2 and model.loss_cfg.use_intra):
        unused = {id(p) for prior in model.priors for p in prior.intra_parameters()}
        params = [p for p in params if id(p) not in unused]
    return params


class _StageLoss(nn.Module):
    """Registers one stage's parameters (the same objects as the model's) and returns the loss terms."""

    def __init__(self, model: HGAD, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.trained = nn.ParameterList(params)
        # a bound method: the model is not a sub-module, so DDP syncs only `trained`
        self.loss_fn = model.loss

    def forward(self, feats: list[Tensor], labels: Tensor, stage: int) -> dict[str, Tensor]:
        return self.loss_fn(feats, labels, stage)


def wrap_loss(model: HGAD, stage: int, ctx: DistContext) -> DistributedDataParallel:
    """DDP over the parameters of ``stage``; calling it returns ``model.loss(feats, labels, stage)``.

    Build one per stage and drop the previous one first (its gradient hooks go with it).
    """
    module = _StageLoss(model, stage_parameters(model, stage))
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)  # the module has no buffers to sync


# ---- collectives -----------------------------------------------------------------------------------
def all_reduce_mean(values: dict[str, Tensor], ctx: DistContext) -> dict[str, Tensor]:
    """Mean over ranks of scalar tensors (float64, on CPU); a non-finite value on any rank stays non-finite.

    Every rank then sees the same numbers, so decisions taken on them (the non-finite guard) agree.
    """
    keys = list(values)
    vec = torch.stack([values[k].detach().to(ctx.device, torch.float64).reshape(()) for k in keys])
    dist.all_reduce(vec)
    vec = (vec / ctx.world_size).cpu()
    return dict(zip(keys, vec.unbind()))


def count_true(flag: bool, ctx: DistContext) -> int:
    """How many ranks pass ``flag=True``."""
    t = torch.tensor([int(flag)], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t)
    return int(t.item())


def merge_disjoint_(t: Tensor, ctx: DistContext, chunk_bytes: int = _CHUNK_BYTES) -> Tensor:
    """In place: every rank filled some rows of a zero tensor ``t``; afterwards all ranks hold all rows.

    The raw bytes are summed (``x + 0 == x`` for every bit pattern, any dtype), so values are exact.
    """
    flat = t.reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), chunk_bytes):
        part = flat[start:start + chunk_bytes]
        if ctx.device.type == "cpu":
            dist.all_reduce(part)
        else:
            staged = part.to(ctx.device)
            dist.all_reduce(staged)
            part.copy_(staged)
    return t


def all_gather_list(items: list[Any], ctx: DistContext | None) -> list[Any]:
    """Concatenation of every rank's ``items`` in rank order (picklable objects; ``items`` when alone)."""
    if ctx is None:
        return items
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]
