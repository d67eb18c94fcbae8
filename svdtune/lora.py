"""Out of svdtune: a spectral delta written as a PEFT LoRA adapter, `export_lora`.

A layer's spectral update is low rank and is its own SVD:
W' - W = U diag(shift) Vh with shift = sigma' - sigma, U and Vh orthonormal, so its
singular values are |shift|. LoRA writes an update as B @ A (B (m, r), A (r, n)); here
B = U diag(sign(shift) sqrt|shift|) and A = diag(sqrt|shift|) Vh, with PEFT's scaling
lora_alpha / r = 1. Keeping the r largest |shift| is the best rank-r approximation, and
what it drops is known exactly (`svdtune.lora_error`).

PEFT's layouts (peft 0.21, ``tuners/lora/layer.py``), by the layer's class name:
- Linear (out, in): ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r).
- transformers Conv1D, weight stored (in, out): the decomposed matrix is weight.T, the
  tensors are as for Linear and the config says ``fan_in_fan_out``.
- Conv1d/2d/3d, matrix (out, in/groups * prod(kernel)): ``lora_A`` is a conv in -> r with
  the layer's kernel (PEFT gives it the layer's stride and padding, but neither dilation
  nor padding mode nor groups), ``lora_B`` a 1x1 conv r -> out with the layer's groups.
  A grouped conv (g groups) becomes LoRA rank g*r: A is block diagonal, one copy of the
  rows of Vh per group, so that each group of outputs reads only its own inputs.
- Embedding (num_embeddings, dim): ``lora_embedding_A`` (r, num_embeddings) and
  ``lora_embedding_B`` (dim, r), the update being A.T @ B.T.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from svdtune import container, kinds
from svdtune.arguments import as_optional_path, as_path
from svdtune.delta import FLOATS, DeltaFile, as_delta_file
from svdtune.errors import SvdtuneError
from svdtune.formula import may_overflow, spectrum_shift
from svdtune.layers import SpectralLayer
from svdtune.lora_error import LayerError, check_max_rank, kept, layer_error, norms_of, overall
from svdtune.model import adapted_units, unwrap
from svdtune.checkpoints import read_state_dict
from svdtune.offline import base_units, warn_if_basis_dependent
from svdtune.report import table_lines
from svdtune.values import all_finite
from svdtune.writing import atomic_write_all, check_replaceable

FORMATS = {"peft": "adapter_model.safetensors", "diffusers": "pytorch_lora_weights.safetensors"}
CONFIG_NAME = "adapter_config.json"  # written for format="peft" only: diffusers reads the ranks off the tensors
LAYOUTS = {"Linear": "linear", "Conv1D": "conv1d-gpt2", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv",
           "Embedding": "embedding"}
NOT_EXPRESSIBLE = {  # class name -> why PEFT LoRA cannot hold its update
    **{f"ConvTranspose{d}d": "PEFT has no LoRA for transposed convolutions" for d in (1, 2, 3)},
    "EmbeddingBag": "PEFT has no LoRA for EmbeddingBag",
    "MultiheadAttention": "svdtune does not export nn.MultiheadAttention's q/k/v spectra to PEFT's packed layout yet",
    "NonDynamicallyQuantizableLinear": "it is an nn.MultiheadAttention's out_proj, whose weight the attention reads "
                                       "directly, so a PEFT LoRA on it has no effect",
}
READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)  # their forward reads child weights directly


@dataclass(eq=False)
class LoraExport:
    """What `export_lora` wrote and what the truncation cost; ``str()`` gives the table the CLI prints.

    Attributes:
        files: the paths written.
        layers: module name -> its `LayerError`.
        overall: the errors of all layers taken as one block-diagonal operator (Frobenius over
            every matrix; spectral: the largest layer error over the largest layer norm).
        adapter_bytes: the size of the files written.
        delta_bytes: the size of the delta file exported, None from a model or an in-memory `DeltaFile`.
    """

    files: list[str]
    layers: dict[str, LayerError]
    overall: LayerError
    adapter_bytes: int
    delta_bytes: int | None = None

    def __str__(self) -> str:
        header = ("layer", "tuned", "lora rank", "update spectral", "update frobenius", "weight spectral",
                  "weight frobenius")
        rows = [(name, str(e.tuned), str(e.rank), *(f"{v:.3e}" for v in dataclasses.astuple(e)[2:]))
                for name, e in [*self.layers.items(), ("(all)", self.overall)]]
        spectral = "-" if self.delta_bytes is None else f"{self.delta_bytes:,} bytes"
        sizes = f"LoRA export {self.adapter_bytes:,} bytes ({', '.join(self.files)}); spectral delta file {spectral}"
        return "\n".join(["relative error of the truncation (0 = exact):", *table_lines(header, rows), "", sizes])


@dataclass(eq=False)
class _Update:
    """One layer's update dW = U diag(shift) Vh and what its errors are relative to."""

    layout: str
    U: Tensor  # (m, k), orthonormal columns
    shift: Tensor  # (k,) sigma' - sigma, float32/64
    Vh: Tensor  # (k, n), orthonormal rows
    sigma: Tensor  # (k,) the tuned singular values of W
    untuned_top: float  # the largest singular value of W without a delta (0.0 if none)
    weight_frobenius2: float  # ||W||_F^2
    dtype: torch.dtype
    groups: int = 1
    conv_shape: tuple[int, ...] = field(default=())  # (out, in/groups, *kernel) for convs


def export_lora(
    source: nn.Module | str | os.PathLike | DeltaFile,
    out_dir: str | os.PathLike,
    rank: int | None = None,
    base: str | os.PathLike | None = None,
    *,
    format: str = "peft",
    prefix: str = "unet",
    max_rank: int | None = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
) -> LoraExport:
    """Write a model's spectral deltas, or a delta file's, as a LoRA adapter that PEFT or diffusers loads.

    Args:
        source: a model passed through `svdtune.apply` (its layers' own factors and shifts), or a
            delta file (path or `DeltaFile`), which then needs ``base``.
        out_dir: the folder to write into (created if missing).
        rank: None writes every tuned value (exact); an int keeps the ``rank`` largest |shift| per layer.
        base: for a delta file, the base checkpoint it was trained on (as for `merge_files`).
        format: "peft": ``adapter_model.safetensors`` with keys ``base_model.model.<name>.lora_A.weight``
            and ``adapter_config.json``, for ``PeftModel.from_pretrained``; "diffusers":
            ``pytorch_lora_weights.safetensors`` with keys ``<prefix>.<name>.lora_A.weight``, for
            ``load_lora_adapter(out_dir, prefix=prefix, use_safetensors=True)`` / a pipeline's ``load_lora_weights``.
        prefix: the diffusers component ("unet", "text_encoder", "transformer", ...).
        max_rank: refuse an export with a layer rank above it (vLLM's ``--max-lora-rank``).
        strict: as for `merge_files`: refuse a base weight that does not match its fingerprint.
        dtype: the factors' dtype; None: each base weight's dtype.

    Returns:
        A `LoraExport`: the files, sizes and per-layer relative errors of the truncation.

    Raises:
        SvdtuneError: a layer PEFT cannot express (ConvTranspose, EmbeddingBag, a dilated conv...),
            fully trained parameters (LoRA has no place for them), a rank above ``max_rank``, a wrong
            base (as `merge_files`), an output that would overwrite an input. Nothing is written then.

    Example:
        >>> svdtune.export_lora("task.safetensors", "task-lora", rank=16, base="base.safetensors")
    """
    _check_arguments(rank, format, prefix, max_rank, dtype)
    folder, base = as_path(out_dir, "out_dir"), as_optional_path(base, "base")
    if not isinstance(source, nn.Module):
        source = source if isinstance(source, DeltaFile) else as_path(source, "the delta file path")
    files = [os.path.join(folder, FORMATS[format]), *([os.path.join(folder, CONFIG_NAME)] if format == "peft" else [])]
    _check_not_inputs(files, source, base)
    _check_out_dir(folder, files)
    updates, names, delta_bytes = _updates(source, base, strict)
    tensors, norms, errors = {}, {}, {}
    for name, update in updates.items():
        _check_format(name, update.layout, format)
        keep = kept(update.shift, rank)
        norms[name] = norms_of(update.shift, update.sigma, keep, update.weight_frobenius2, update.untuned_top)
        errors[name] = layer_error(norms[name], update.shift.numel(), keep.numel() * update.groups)
        key = f"base_model.model.{name}" if format == "peft" else f"{prefix}.{name}"
        tensors.update({f"{key}.{k}": v for k, v in _finite(name, update, _lora_tensors(update, keep, dtype)).items()})
    check_max_rank(errors, max_rank)
    # Nothing above wrote anything.
    os.makedirs(folder, exist_ok=True)
    written = {files[0]: container.encode(tensors, {"format": "pt"})}
    if format == "peft":
        config = json.dumps(_config(updates, errors, names), indent=2, sort_keys=True)
        written[files[1]] = [config.encode("utf-8") + b"\n"]
    atomic_write_all(written)  # the adapter and its config together, or neither
    size = sum(os.path.getsize(f) for f in files)
    return LoraExport(files, errors, overall(list(norms.values()), list(errors.values())), size, delta_bytes)


def _check_arguments(rank: object, format: object, prefix: object, max_rank: object, dtype: object) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise SvdtuneError(f"rank={rank!r} must be a positive int, or None for an exact export.")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise SvdtuneError(f"max_rank={max_rank!r} must be a positive int (e.g. vLLM's --max-lora-rank), or None.")
    if not isinstance(format, str) or format not in FORMATS:
        raise SvdtuneError(f"format={format!r} is not one of {sorted(FORMATS)}.")
    if not isinstance(prefix, str) or not prefix.isprintable() or "" in prefix.split("."):
        raise SvdtuneError(f"prefix={prefix!r} must be a diffusers component name such as 'unet' or 'text_encoder'.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in FLOATS):
        raise SvdtuneError(f"dtype={dtype!r} must be one of {[str(d) for d in FLOATS]}, or None for the base weights' dtype.")


def _updates(source: object, base: object, strict: bool) -> tuple[dict[str, _Update], set[str], int | None]:
    """(the updates by layer name, every module name of the model, the delta file's size)."""
    if isinstance(source, nn.Module):
        if base is not None:
            raise SvdtuneError("base= is for delta files; a model's layers hold their own base weights: drop base=.")
        model = unwrap(source)
        return _model_updates(model), {name for name, _ in model.named_modules() if name}, None
    updates, names = _file_updates(source, base, strict)
    return updates, names, None if isinstance(source, DeltaFile) else os.path.getsize(source)


def _check_out_dir(folder: str, files: list[str]) -> None:
    """Refuse, before any work, an ``out_dir`` that is not a folder, or files in it that cannot be replaced."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SvdtuneError(f"out_dir {folder!r} is a file; give a folder (it is created if missing).")
    if os.path.isdir(folder):
        for path in files:
            check_replaceable(path)


def _finite(name: str, update: _Update, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Refuse an update that makes W' non-finite in the weight's dtype (as `merge_files` does; the bound
    `svdtune.formula.may_overflow` decides without building W'), or factors that overflow the export's dtype."""
    top = max(float(update.sigma.abs().max()) if update.sigma.numel() else 0.0, update.untuned_top)
    if may_overflow(top, update.shift, update.dtype):
        raise SvdtuneError(f"layer {name!r}: its update may make the weight non-finite in {update.dtype} (as merge_files "
                           "refuses); check the delta's deltas and scale.")
    if not all(map(all_finite, tensors.values())):
        out = next(iter(tensors.values())).dtype
        raise SvdtuneError(f"layer {name!r}: its LoRA factors overflow {out}; export in a wider dtype (dtype=torch.float32).")
    return tensors


def _check_not_inputs(files: list[str], source: object, base: object) -> None:
    inputs = [os.path.realpath(p) for p in (source, base) if isinstance(p, (str, os.PathLike))]
    for path in files:
        if os.path.realpath(path) in inputs:
            raise SvdtuneError(f"writing {path!r} would overwrite an input file; choose another output folder.")


def _model_updates(model: nn.Module) -> dict[str, _Update]:
    units = list(adapted_units(model))  # (unit name, layer, part)
    if not units:
        raise SvdtuneError("the model has no svdtune layers to export; call svdtune.apply(model, targets=...) first.")
    deltas = {id(layer.spectral_delta(part)) for _, layer, part in units}
    trained = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in deltas]
    _refuse_trained(trained)
    modules = dict(model.named_modules())
    for name, _, part in units:
        parent = modules[kinds.split_unit(name, part or None).rpartition(".")[0]]
        if isinstance(parent, READS_WEIGHTS):
            shown = parent._spectral.original_class if isinstance(parent, SpectralLayer) else type(parent)
            raise _not_expressible(name, f"layer inside a {shown.__name__}", "its forward (the fused fast path) "
                                   "reads this layer's weight directly, so a PEFT LoRA on it has no effect")
    with torch.no_grad():
        return {_checked_name(name): _layer_update(name, layer, part) for name, layer, part in units}


def _layer_update(name: str, layer: SpectralLayer, part: str) -> _Update:
    factors, base, cls = layer.spectral_factors(part), layer.base_weight, layer._spectral.original_class
    layout = _module_layout(name, layer, cls)
    matrix = layer.base_matrix(part).detach().double()
    return _Update(layout, factors.U, layer.spectral_shift(part), factors.Vh, factors.sigma, float(factors.next_sigma or 0.0),
                   float(matrix.square().sum()), base.dtype, getattr(layer, "groups", 1), tuple(base.shape))


def _module_layout(name: str, layer: nn.Module, cls: type[nn.Module]) -> str:
    """The layout of an adapted layer, from its original class and its ancestors (subclasses too)."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        dilated = any(d != 1 for d in layer.dilation)
        if dilated or layer.padding_mode != "zeros":
            what = f"dilation={layer.dilation}" if dilated else f"padding_mode={layer.padding_mode!r}"
            raise _not_expressible(name, cls.__name__, f"PEFT's conv LoRA cannot express {what} (its lora_A has neither)")
    for ancestor in cls.__mro__:  # by name: transformers' Conv1D is recognised without importing transformers
        if ancestor.__name__ in NOT_EXPRESSIBLE and ancestor.__name__ != "NonDynamicallyQuantizableLinear":
            raise _not_expressible(name, cls.__name__, NOT_EXPRESSIBLE[ancestor.__name__])
        if ancestor.__name__ in LAYOUTS and ancestor.__module__.startswith(("torch.nn", "transformers")):
            return LAYOUTS[ancestor.__name__]
    raise _not_expressible(name, cls.__name__, "PEFT has no LoRA for this layer class")


def _record_layout(name: str, class_name: str) -> str:
    """The layout of a delta-file layer, from its class name; a class svdtune cannot place is refused."""
    if class_name in NOT_EXPRESSIBLE:
        raise _not_expressible(name, class_name, NOT_EXPRESSIBLE[class_name])
    if class_name not in LAYOUTS:
        raise SvdtuneError(f"layer {name!r} is a {class_name}, a class whose LoRA layout a delta file cannot tell; "
                           "load the delta into the model (svdtune.load_delta) and export the model instead.")
    return LAYOUTS[class_name]


def _not_expressible(name: str, class_name: str, why: str) -> SvdtuneError:
    return SvdtuneError(f"layer {name!r} is a {class_name}: {why}; exclude it from the export's source "
                        "(apply/save without it), or deploy with svdtune.merge / merge_files instead.")


def _refuse_trained(names: list[str]) -> None:
    if names:
        raise SvdtuneError(f"{names[0]!r} is fully trained, and a LoRA adapter cannot hold it (PEFT would need "
                           "modules_to_save, which vLLM refuses); export spectral deltas only, or merge instead.")


def _checked_name(name: str) -> str:
    if not name:
        raise SvdtuneError("the root module itself is adapted, and PEFT cannot target the root; wrap it in a "
                           "container (e.g. nn.Sequential(layer)) and apply svdtune there.")
    return name


def _file_updates(source: str | os.PathLike | DeltaFile, base: str | os.PathLike | None,
                  strict: bool) -> tuple[dict[str, _Update], set[str]]:
    """The updates of a delta file, decomposing each base weight as `merge_files` does."""
    if base is None:
        raise SvdtuneError("exporting a delta file needs base=, the base checkpoint it was trained on: the LoRA "
                           "factors are that base's singular vectors.")
    record = as_delta_file(source)
    _refuse_trained([*record.params, *record.buffers])
    state = read_state_dict(base)
    layouts = {name: _record_layout(name, layer.layer_class) for name, layer in record.layers.items()}  # refusals first
    for name in record.layers:
        _checked_name(name)
    units, factors = base_units(state, record, strict, "exporting")  # as merge_files
    updates = {name: _file_update(name, layer, units[name], factors(name), layouts[name])
               for name, layer in record.layers.items()}
    return updates, {key.rpartition(".")[0] for key in state if "." in key}


def _file_update(name: str, layer, unit, factors, layout: str) -> _Update:
    """The update of one delta record; ``unit`` is where its matrix is in the base (`offline._file_unit`)."""
    k, sigma = layer.rank, factors.sigma
    shift = spectrum_shift(sigma[:k], layer.delta.to(sigma.dtype), layer.scale, layer.mode)
    warn_if_basis_dependent(name, factors, shift, layer.fingerprint)
    untuned = float(sigma[k]) if k < sigma.numel() else 0.0
    weight = unit.recorded
    return _Update(layout, factors.U[:, :k], shift, factors.Vh[:k], sigma[:k], untuned,
                   float(unit.matrix.double().square().sum()), weight.dtype, 1, tuple(weight.shape))


def _check_format(name: str, layout: str, format: str) -> None:
    if format == "diffusers" and layout not in ("linear", "conv"):
        raise SvdtuneError(f"layer {name!r} ({layout}): format='diffusers' is for Linear and Conv layers; "
                           "export it with format='peft'.")


def _lora_tensors(update: _Update, keep: Tensor, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """PEFT's tensors for B @ A = U_r diag(shift_r) Vh_r, the shift split evenly (sqrt) between B and A."""
    work = update.shift.dtype  # float32, or float64 for float64 weights
    shift = update.shift[keep]
    root = shift.abs().sqrt()
    b = update.U[:, keep].to(work) * (torch.sign(shift) * root)  # (m, r)
    a = update.Vh[keep].to(work) * root[:, None]  # (r, n)
    if update.layout == "embedding":  # the update (num_embeddings, dim) is lora_embedding_A.T @ lora_embedding_B.T
        tensors = {"lora_embedding_A": b.t(), "lora_embedding_B": a.t()}
    elif update.layout == "conv":
        tensors = _conv_tensors(update, a, b)
    else:
        tensors = {"lora_A.weight": a, "lora_B.weight": b}
    out = dtype or update.dtype
    return {key: value.to("cpu", out).contiguous() for key, value in tensors.items()}


def _conv_tensors(update: _Update, a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """lora_A: conv in -> groups*r with the layer's kernel; lora_B: 1x1 conv groups*r -> out with its groups."""
    out, per_group, *kernel = update.conv_shape
    r, groups = a.shape[0], update.groups
    a = a.reshape(r, per_group, *kernel)  # (r, in/groups, *kernel)
    if groups > 1:  # block diagonal: the r rows of group g read only group g's inputs
        blocks = torch.zeros(groups * r, groups * per_group, *kernel, dtype=a.dtype, device=a.device)
        for g in range(groups):
            blocks[g * r:(g + 1) * r, g * per_group:(g + 1) * per_group] = a
        a = blocks
    return {"lora_A.weight": a, "lora_B.weight": b.reshape(out, r, *[1] * len(kernel))}  # B: (out, groups*r/groups, 1..)


def _config(updates: dict[str, _Update], errors: dict[str, LayerError], names: set[str]) -> dict[str, object]:
    """adapter_config.json: scaling lora_alpha / r = 1 for every layer, whether or not a reader honours the patterns.

    Pattern keys are "^" + the escaped module name, which PEFT and vLLM (``(.*\\.)?(key)$``) match
    exactly that module. Modules that the suffix rule of ``target_modules`` would also catch
    (``fc`` catches ``head.fc``) are listed in ``exclude_modules``, a full-match regular expression.
    """
    ranks = {name: error.rank for name, error in errors.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = {"^" + re.escape(name): rank for name, rank in ranks.items() if rank != r}
    targets = sorted(updates)
    caught = sorted(m for m in names - set(targets) if any(m.endswith("." + t) for t in targets))
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": targets,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "exclude_modules": "|".join(re.escape(m) for m in caught) or None,
        "fan_in_fan_out": any(u.layout == "conv1d-gpt2" for u in updates.values()),
        "bias": "none", "lora_bias": False, "use_dora": False, "use_rslora": False, "lora_dropout": 0.0,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "task_type": None,
        "base_model_name_or_path": None,
    }
