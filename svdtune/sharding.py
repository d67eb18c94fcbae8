"""FSDP2 (``torch.distributed.fsdp.fully_shard``): what svdtune does with a sharded model.

Design: the factors U, sigma, Vh are frozen parameters of each adapted layer (see
`svdtune.layers`), so ``fully_shard`` shards them like the base weights and the
deltas: each rank holds 1/N of every factor, and FSDP2 gathers one layer group at a
time for its forward and backward. The order is: load the base weights, `svdtune.apply`
(the SVDs run on the full weights), then ``fully_shard``, then build the optimizer
from `svdtune.trainable_parameters`.

- Training: the forwards read the parameters FSDP2 swaps in (gathered copies), which
  count as current (no SVD is run again); FSDP2 reduce-scatters the deltas' gradients.
- Outside a forward the parameters are the DTensor shards; reading ``layer.weight``
  then gives the sharded base weight (FSDP2 reads it to manage it), not W'.
- `save_delta` gathers each delta, factor and weight it records (a collective: call it
  on every rank); rank 0 writes the file, the same file an unsharded model with the same
  deltas writes.
- `load_delta`, `merge`, `restore` and a second `apply` change layers, which FSDP2
  manages: they refuse a sharded model. Load a delta before ``fully_shard``; to merge,
  save the delta and merge it into a plain model (or offline with ``svdtune merge``).
- The eval cache of W' is off under FSDP2 (it would hold a full W' per layer on every rank).
- ``print(model)`` and `svdtune.report` read only shapes (`SpectralLayer._matrix_shape`), never sharded data, so
  one rank may call them alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from svdtune.errors import SvdtuneError


def is_dtensor(tensor: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (False when that module was never imported)."""
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(tensor, cls)


def full(tensor: Tensor) -> Tensor:
    """The whole tensor: a DTensor gathered from every rank (a collective), any other tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def sharded_tensors(module: nn.Module) -> list[str]:
    """The names of the module's parameters that are DTensors (sharded by FSDP2)."""
    return [name for name, param in module.named_parameters() if is_dtensor(param)]


def refuse_sharded(model: nn.Module, action: str, instead: str) -> None:
    """Raise if FSDP2 shards the model: ``action`` would change layers FSDP2 manages."""
    names = sharded_tensors(model)
    if names:
        raise SvdtuneError(f"cannot {action} a model sharded by FSDP2 (e.g. {names[0]!r} is a DTensor); {instead}")


def write_on_rank_zero(write: Callable[[], None], path: object, like: Tensor) -> None:
    """Run ``write`` on rank 0 only; every rank returns once it is done, or raises if it failed (rank 0 with
    its own error), so that no rank waits forever. ``like``: a sharded tensor, whose device the
    collectives use (CPU for gloo, the GPU for NCCL)."""
    import torch.distributed as dist

    failed, error = torch.zeros(1, device=like.to_local().device if is_dtensor(like) else like.device), None
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as caught:  # re-raised below, after telling the other ranks
            failed.fill_(1)
            error = caught
    dist.broadcast(failed, src=0)
    if error is not None:
        raise error
    if bool(failed.item()):
        raise SvdtuneError(f"rank 0 could not write {str(path)!r}; its error says why.")
