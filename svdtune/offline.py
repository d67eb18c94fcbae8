"""Working on delta files without model code: `merge_files` and `combine`.

`merge_files` bakes a delta into a base state dict read from disk. It decomposes
each base weight again, so its result equals `svdtune.merge` on the model up to
float rounding: the SVD is deterministic for a given weight, device and library,
and the sign of each singular pair cancels in U diag(shift) Vh. Where the base
has (nearly) repeated singular values that get different shifts, the singular
basis inside that subspace is arbitrary and the merged weight depends on it:
that is detected and warned about.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from svdtune import container, kinds
from svdtune.arguments import as_path
from svdtune.cache import decompose_named
from svdtune.decompose import Decomposition
from svdtune.config import as_scale, finite_number
from svdtune.basis import Basis, basis_changes, repeated_pairs
from svdtune.delta import DeltaFile, Fingerprint, LayerDelta, as_delta_file, check_base
from svdtune.fingerprint import FLOATS
from svdtune.errors import SvdtuneError
from svdtune.formula import check_finite_merge, merged_matrix, spectrum_shift
from svdtune.checkpoints import read_state_dict



def warn_if_basis_dependent(name: str, factors: Decomposition, shift: Tensor, recorded: Fingerprint) -> None:
    """Warn if the deltas of (nearly) repeated singular values may meet other singular vectors
    than in training (see `svdtune.basis`), saying by how much the merged weight can differ.

    Args:
        name: the layer, for the message.
        factors: this decomposition, with the k singular values that get a shift (or more).
        shift: (k,) sigma' - sigma.
        recorded: the layer's fingerprint from the delta file.
    """
    k = shift.numel()
    next_sigma = float(factors.sigma[k]) if k < factors.sigma.numel() else factors.next_sigma  # first untuned
    pairs = repeated_pairs(factors.sigma[:k], shift, next_sigma)
    top = float(factors.sigma[0])
    changes = basis_changes(recorded.basis, factors.U[:, :k], factors.Vh[:k], shift, pairs, top, next_sigma is not None)
    if not changes:
        return
    run, spread = changes[0]
    warnings.warn(
        f"layer {name!r}: singular values {list(run)} are repeated and get different deltas, and this SVD may have "
        "picked other singular vectors for them than training did (another dtype, library, thread count or "
        f"machine), so the merged weight can differ from the trained one by up to {spread:.3g} in spectral norm "
        f"({spread / top:.2%} of its largest singular value); merge on the training machine (svdtune.merge) for "
        "an exact result.",
        RuntimeWarning, stacklevel=4,
    )


def merge_files(
    base: str | os.PathLike,
    delta: str | os.PathLike | DeltaFile,
    out: str | os.PathLike,
    scale: float = 1.0,
    strict: bool = True,
) -> None:
    """Bake a delta file into a base checkpoint and write the merged state dict, no model code needed.

    Args:
        base: the base state dict: ``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` (any case)
            (read with ``torch.load(weights_only=True)``; ``{"params": sd}`` is unwrapped).
        delta: a delta file path or a `DeltaFile`.
        out: the output ``.safetensors`` file: the base state dict with merged weights
            (and the delta's fully trained parameters and their modules' buffers); written atomically.
        scale: multiplies each layer's stored scale (0.0 gives back the base weights).
        strict: if False, a base weight that does not match its fingerprint is merged
            anyway, with a warning.

    Raises:
        SvdtuneError: unreadable files, a base refused by `read_state_dict`'s rules (e.g.
            saved from an adapted model), a layer missing from the base or of another
            shape, a fingerprint mismatch (strict), a non-finite result, an ``out`` not
            ending with ``.safetensors`` or that is the base or the delta (by any path).
        OSError: ``out`` cannot be written, e.g. its folder does not exist.

    Example:
        >>> svdtune.merge_files("base.pth", "task.safetensors", "merged.safetensors", scale=0.8)
    """
    base, out = as_path(base, "base"), as_path(out, "out")
    container.check_destination(out)  # before any work
    scale = as_scale(scale)
    record = as_delta_file(delta)
    container.check_not_an_input(out, [base] if isinstance(delta, DeltaFile) else [base, delta])
    state = read_state_dict(base)
    merged = {**state, **_trained_tensors(state, record)}
    units, factors = base_units(state, record, strict, "merging")
    blocks: dict[str, dict[int | None, Tensor]] = {}  # state-dict key -> {part's row block: merged matrix}
    for name, layer in record.layers.items():
        unit = units[name]
        blocks.setdefault(unit.key, {})[unit.part.block] = _merged_matrix(name, unit.matrix, factors(name), layer, scale)
    for key, merged_blocks in blocks.items():
        merged[key] = _in_layout(state[key], kinds.kind_named(record.layers[_first(units, key)].layer_class), merged_blocks)
    container.atomic_write(out, container.encode(merged, {"format": "pt"}))


def base_units(state: dict[str, Tensor], record: DeltaFile, strict: bool, action: str):
    """Where each record's matrix is in the base state dict, checked against its fingerprint, and its decomposition.

    Every hash is checked before any SVD, so a wrong base fails fast.

    Returns:
        ({name: _FileUnit}, factors), where ``factors(name)`` decomposes that unit's matrix with the record's
        method (computed once, on first use).

    Raises:
        SvdtuneError: a record's weight is missing or misshaped in the base, or does not match (strict).
    """
    units = {name: _file_unit(state, name, layer) for name, layer in record.layers.items()}
    factors = functools.cache(lambda name: _decompose(name, units[name].matrix, record.layers[name]))
    for name, layer in record.layers.items():
        check_base(name, layer.fingerprint, units[name].recorded, lambda: factors(name).sigma, strict,
                   "use the base checkpoint the delta was trained on (or --force on the command line)", action)
    return units, factors


def _trained_tensors(state: dict[str, Tensor], record: DeltaFile) -> dict[str, Tensor]:
    """The delta's fully trained parameters and buffers, checked against the base and cast to its dtypes."""
    tensors = {}
    for kind, values in (("parameter", record.params), ("buffer", record.buffers)):
        for name, value in values.items():
            if name not in state or tuple(state[name].shape) != tuple(value.shape):
                raise SvdtuneError(f"{kind} {name!r} of the delta file is missing from the base checkpoint or has "
                                   "another shape; use the base checkpoint the delta was trained on.")
            tensors[name] = value.to(state[name].dtype)
    return tensors


@dataclasses.dataclass(frozen=True)
class _FileUnit:
    """Where a delta record's matrix is in a base state dict."""

    key: str  # the state-dict key of its parameter, e.g. "h.0.attn.c_attn.weight", "attn.in_proj_weight"
    part: kinds.Part
    matrix: Tensor  # the (m, n) matrix decomposed (a view of the parameter)
    recorded: Tensor  # what the record's shape and fingerprint are of: the part's matrix, or the parameter


def _file_unit(state: dict[str, Tensor], name: str, layer: LayerDelta) -> _FileUnit:
    module = kinds.split_unit(name, layer.part)
    part = kinds.file_part(layer.part, module, set(state))
    key = f"{module}.{part.param}"
    weight = state.get(key)
    if weight is None:
        raise SvdtuneError(f"layer {name!r} of the delta file has no weight {key!r} in the base checkpoint; "
                           "use the base checkpoint the delta was trained on.")
    packed_ok = part.block is None or (weight.dim() == 2 and weight.shape[0] % len(kinds.MHA_PARTS) == 0)
    matrix = kinds.matrix(kinds.kind_named(layer.layer_class), weight, part) if packed_ok else weight
    recorded = matrix if part.name else weight
    if not packed_ok or tuple(recorded.shape) != layer.weight_shape or weight.dtype not in FLOATS:
        raise SvdtuneError(f"layer {name!r}: base weight {key!r} is {list(weight.shape)} {weight.dtype}, the delta "
                           f"expects {list(layer.weight_shape)}{' (per part)' if part.name else ''} in float16, bfloat16, "
                           "float32 or float64; use the base checkpoint the delta was trained on (cast a float8 one).")
    return _FileUnit(key, part, matrix, recorded)


def _decompose(name: str, weight: Tensor, layer: LayerDelta) -> Decomposition:
    """The decomposition the delta's basis came from: the recorded randomized SVD at the file's rank,
    or the exact SVD with all singular values (so the one after the top k is checked for repeats)."""
    if layer.svd is None:
        return decompose_named(name, weight, None, None, None)
    return decompose_named(name, weight, layer.rank, None, layer.svd)


def _first(units: dict[str, _FileUnit], key: str) -> str:
    return next(name for name, unit in units.items() if unit.key == key)


def _in_layout(base: Tensor, kind: kinds.LayerKind, blocks: dict[int | None, Tensor]) -> Tensor:
    """The merged parameter in ``base``'s layout: the merged matrix written back (Conv1D: transposed), or for a
    packed parameter its row blocks, the base's own where the file has no part."""
    if None in blocks:
        return kinds.layout(kind, tuple(base.shape), [blocks[None]])
    rows = base.shape[0] // len(kinds.MHA_PARTS)
    own = [base[i * rows:(i + 1) * rows] for i in range(len(kinds.MHA_PARTS))]
    return kinds.layout(kind, tuple(base.shape), [blocks.get(i, own[i]) for i in range(len(own))])


def _merged_matrix(name: str, matrix: Tensor, factors: Decomposition, layer: LayerDelta, scale: float) -> Tensor:
    """W' = W + U diag(shift) Vh of the unit's matrix in its dtype, computed as `svdtune.merge` does.

    ``factors`` holds the top k singular values or more, and tells the first untuned one, which is
    checked for repeats too.
    """
    k, sigma = layer.rank, factors.sigma
    shift = spectrum_shift(sigma[:k], layer.delta.to(sigma.dtype), layer.scale * scale, layer.mode)
    warn_if_basis_dependent(name, factors, shift, layer.fingerprint)
    result = merged_matrix(matrix, factors.U[:, :k], factors.Vh[:k], shift)
    check_finite_merge(name, result)
    return result


@container.paused_gc()  # a file can hold very many basis runs: many objects, none garbage
def combine(deltas: Iterable[str | os.PathLike | DeltaFile], weights: Iterable[float]) -> DeltaFile:
    """A weighted sum of delta files trained on the same base, in their shared singular basis.

    All inputs must hold the same layers, with the same class, shape, rank, mode and
    base fingerprint. Per layer, the result's delta is sum_i w_i * delta_i when all
    inputs share one scale (kept); otherwise sum_i w_i * scale_i * delta_i, with scale 1.

    Args:
        deltas: delta file paths or `DeltaFile`s (any iterable, a generator too).
        weights: one finite number per delta (they need not sum to 1).

    Returns:
        A `DeltaFile`; write it with ``.save(path)`` or pass it to `load_delta`/`merge_files`.

    Raises:
        SvdtuneError: no inputs, a weight count or value mismatch, or inputs that do
            not share layers, ranks, modes and base weights, or hold fully trained parameters.

    Example:
        >>> svdtune.combine(["sharp.safetensors", "warm.safetensors"], [0.7, 0.3]).save("mix.safetensors")
    """
    if isinstance(deltas, (str, bytes, os.PathLike, DeltaFile)):
        raise SvdtuneError("combine needs a list of deltas (paths or DeltaFiles), got one; pass [delta, ...].")
    try:
        deltas, weights = list(deltas), list(weights)  # iterated more than once below
    except TypeError:
        raise SvdtuneError(f"combine needs a list of deltas and a list of weights, got {type(deltas).__name__} and "
                           f"{type(weights).__name__}.") from None
    if not deltas or len(weights) != len(deltas):
        raise SvdtuneError(f"combine needs one weight per delta, got {len(deltas)} deltas and {len(weights)} weights.")
    numbers = [finite_number(w) for w in weights]
    if None in numbers:
        raise SvdtuneError(f"weights={weights!r} must be finite numbers.")
    deltas = [d if isinstance(d, DeltaFile) else as_path(d, f"delta {i}") for i, d in enumerate(deltas)]
    labels = [f"delta {i} ({d if not isinstance(d, DeltaFile) else 'in memory'})" for i, d in enumerate(deltas)]
    files: list[DeltaFile] = []
    for label, delta in zip(labels, deltas):  # each input is checked as soon as it is read: a refusal reads no more
        files.append(as_delta_file(delta))
        _check_compatible(files[0], files[-1], labels[0], label)
    layers = {name: _combined_layer(name, [f.layers[name] for f in files], numbers) for name in files[0].layers}
    sources = [[label, w] for label, w in zip(labels, numbers)]
    return DeltaFile(layers, {}, {"combined_from": json.dumps(sources)})


def _check_compatible(first: DeltaFile, other: DeltaFile, first_label: str, label: str) -> None:
    trained = [*other.params, *other.buffers]
    if trained:
        raise SvdtuneError(f"{label} also holds fully trained parameters or buffers ({trained[0]!r}), which cannot "
                           "be combined as spectral deltas; combine deltas saved without trainable modules.")
    if set(other.layers) != set(first.layers):
        name = sorted(set(other.layers) ^ set(first.layers))[0]
        raise SvdtuneError(f"layer {name!r} is in only one of {first_label} and {label}; combine deltas of the same layers.")
    for name, layer in other.layers.items():
        ref = first.layers[name]
        same = ((layer.layer_class, layer.weight_shape, layer.rank, layer.mode, layer.part, layer.svd)
                == (ref.layer_class, ref.weight_shape, ref.rank, ref.mode, ref.part, ref.svd))
        if not same or layer.fingerprint.sha256 != ref.fingerprint.sha256:
            raise SvdtuneError(f"layer {name!r} differs between {first_label} and {label} (class, shape, rank, mode, "
                               "svd method or base weights); combine only deltas trained with the same settings on the same base model.")


def _combined_layer(name: str, layers: list[LayerDelta], weights: list[float]) -> LayerDelta:
    scales = {layer.scale for layer in layers}
    keep = len(scales) == 1
    total = torch.zeros(layers[0].rank, dtype=torch.float64)
    for layer, w in zip(layers, weights):
        total += layer.delta.double() * (w if keep else w * layer.scale)
    first = layers[0]
    if not bool(torch.isfinite(total.to(first.delta.dtype)).all()):
        raise SvdtuneError(f"the combined deltas overflow {first.delta.dtype}; use smaller weights.")
    fingerprint = dataclasses.replace(first.fingerprint, basis=_combined_basis(name, layers))
    return LayerDelta(first.layer_class, first.weight_shape, first.mode, first.scale if keep else 1.0,
                      fingerprint, total.to(first.delta.dtype), first.part, first.svd)


def _combined_basis(name: str, layers: list[LayerDelta]) -> tuple[Basis, ...]:
    """Every input's recorded runs; where two inputs recorded other vectors for the same
    columns (trained with another SVD), the first input's are kept, with a warning.

    Linear in the number of recorded columns: the kept runs are disjoint, so each
    column has at most one owner.
    """
    first = layers[0].fingerprint.basis
    if all(layer.fingerprint.basis == first for layer in layers[1:]):
        return first  # the runs of one input are disjoint and in order (checked when read): nothing to add or warn about
    owner: dict[int, Basis] = {}  # column -> the kept run holding it
    clashes: list[Basis] = []
    for i, layer in enumerate(layers):
        if i and layer.fingerprint.basis == first:
            continue  # all kept already (the first input's runs are disjoint): nothing to add or warn about
        for run in layer.fingerprint.basis:
            owners = {id(owner[c]): owner[c] for c in run.columns if c in owner}
            if any(b != run for b in owners.values()):
                clashes.append(run)
            elif not owners:
                owner.update((c, run) for c in run.columns)
    if clashes:  # one warning a layer, however many runs clash
        more = f" and {len(clashes) - 1:,} more runs" if len(clashes) > 1 else ""
        warnings.warn(
            f"layer {name!r}: the deltas were trained with different singular vectors for the repeated "
            f"singular values {list(clashes[0].columns)}{more}, so their sum mixes directions there; the combined "
            "file records the first delta's vectors.", RuntimeWarning, stacklevel=4,
        )
    kept = {id(run): run for run in owner.values()}.values()
    return tuple(sorted(kept, key=lambda run: run.columns))
