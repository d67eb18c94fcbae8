"""Layer kinds: the one table of what svdtune adapts and how each weight becomes a matrix.

Per kind (`KINDS`): which classes it covers, how a weight is viewed as the matrix
(m, n) that is decomposed and how a matrix is written back in the parameter's
layout, which parameters (and parts of them) it has, and which training forward
an adapted layer of that kind uses (see `svdtune.forwards`):

    kind                 matrix (m, n)                       parts                forward
    Linear               weight (out, in)                    one                  linear
    Conv1d/2d/3d         weight.reshape(out, -1)             one                  the class's own
    ConvTranspose1d/2d/3d weight.reshape(in, -1)             one                  the class's own
    Conv1D (transformers) weight.T (out, in); stored (in, out) one                linear
    Embedding            weight (num_embeddings, dim)        one                  embedding
    EmbeddingBag         weight (num_embeddings, dim)        one                  embedding_bag
    MultiheadAttention   q, k, v: the row blocks of          q_proj, k_proj,      attention
                         in_proj_weight (3E, E), or          v_proj
                         q/k/v_proj_weight when separate

transformers is never imported here: its ``Conv1D`` is found in ``sys.modules``,
where it is whenever a model holds one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MHA_PARTS = ("q_proj", "k_proj", "v_proj")  # the parts of nn.MultiheadAttention, in in_proj_weight's row order


@dataclass(frozen=True)
class Part:
    """One matrix of a module that gets its own spectrum.

    Attributes:
        name: "" for a module's only matrix (the unit is the module itself), else one of `MHA_PARTS`.
        param: the parameter that holds it, e.g. "weight", "in_proj_weight", "q_proj_weight".
        block: for a packed parameter, which of its equal row blocks (0, 1, 2); None for the whole parameter.
    """

    name: str
    param: str
    block: int | None = None


@dataclass(frozen=True)
class LayerKind:
    """How svdtune adapts one kind of layer.

    Attributes:
        name: the class name delta files record, e.g. "Linear", "Conv1D".
        ndim: the ndim of each part's parameter.
        transposed: the matrix is ``weight.T`` (Conv1D stores (in, out)); else ``weight.reshape(shape[0], -1)``.
        forward: the training forward of an adapted layer: "linear", "embedding", "embedding_bag",
            "attention", or "own" (the class's own forward, reading the adapted weight).
        classes: returns the classes of this kind (called at lookup, so optional libraries stay lazy).
    """

    name: str
    ndim: int
    transposed: bool
    forward: str
    classes: Callable[[], tuple[type[nn.Module], ...]]

    def parts(self, module: nn.Module) -> tuple[Part, ...]:
        """The parts of ``module`` (of this kind) that get their own spectrum."""
        if self.name != "MultiheadAttention":
            return (Part("", "weight"),)
        if module._parameters.get("in_proj_weight") is not None:
            return tuple(Part(name, "in_proj_weight", i) for i, name in enumerate(MHA_PARTS))
        return tuple(Part(name, f"{name}_weight") for name in MHA_PARTS)

    def __reduce__(self):  # pickled by name (``classes`` is a function): one object per kind
        return kind_named, (self.name,)

    def params(self) -> tuple[str, ...]:
        """Every parameter name a module of this kind may adapt."""
        if self.name == "MultiheadAttention":
            return ("in_proj_weight", *(f"{name}_weight" for name in MHA_PARTS))
        return ("weight",)


def _transformers_conv1d() -> tuple[type[nn.Module], ...]:
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def _kind(name: str, ndim: int, forward: str, cls: type[nn.Module], transposed: bool = False) -> LayerKind:
    return LayerKind(name, ndim, transposed, forward, lambda: (cls,))


# Order matters only for subclasses of two kinds' classes (none in torch): the first match wins.
KINDS: tuple[LayerKind, ...] = (
    _kind("Linear", 2, "linear", nn.Linear),
    *(_kind(f"Conv{d}d", d + 2, "own", getattr(nn, f"Conv{d}d")) for d in (1, 2, 3)),
    *(_kind(f"ConvTranspose{d}d", d + 2, "own", getattr(nn, f"ConvTranspose{d}d")) for d in (1, 2, 3)),
    LayerKind("Conv1D", 2, True, "linear", _transformers_conv1d),
    _kind("Embedding", 2, "embedding", nn.Embedding),
    _kind("EmbeddingBag", 2, "embedding_bag", nn.EmbeddingBag),
    _kind("MultiheadAttention", 2, "attention", nn.MultiheadAttention),
)
BY_NAME: dict[str, LayerKind] = {kind.name: kind for kind in KINDS}
# A record of one of these classes needs delta format version 4 (older readers would use the wrong layout).
NEW_IN_VERSION_4 = ("Conv1D", "Embedding", "EmbeddingBag", "MultiheadAttention")
# How a record of an unknown class (a user's own layer recorded under its name) is read.
DEFAULT = LayerKind("", 0, False, "own", lambda: ())


def kind_of(module: nn.Module | type[nn.Module]) -> LayerKind | None:
    """The kind of a module (or class), or None if svdtune cannot adapt it.

    An adapted module is looked up by its original class.
    """
    cls = module if isinstance(module, type) else type(module)
    state = None if isinstance(module, type) else module.__dict__.get("_spectral")
    cls = state.original_class if state is not None else cls
    return next((kind for kind in KINDS if issubclass(cls, kind.classes())), None)


def is_supported(module: nn.Module) -> bool:
    """True if svdtune can adapt ``module`` itself (not counting the layers inside it)."""
    return kind_of(module) is not None


def kind_named(class_name: str) -> LayerKind:
    """The kind a delta record's class name stands for; `DEFAULT` (rows layout) for unknown names."""
    return BY_NAME.get(class_name, DEFAULT)


def supported_names() -> str:
    """The kinds, for messages: "Linear, Conv1d, ..., Conv1D (transformers), ..., MultiheadAttention"."""
    return ", ".join(f"{kind.name} (transformers)" if kind.name == "Conv1D" else kind.name for kind in KINDS)


def matrix(kind: LayerKind, weight: Tensor, part: Part) -> Tensor:
    """The (m, n) matrix of ``part`` in its parameter ``weight``: a view, never a copy."""
    if part.block is not None:
        rows = weight.shape[0] // len(MHA_PARTS)
        return weight[part.block * rows:(part.block + 1) * rows]
    if kind.transposed:
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def layout(kind: LayerKind, shape: tuple[int, ...], matrices: list[Tensor]) -> Tensor:
    """The parameter of ``shape`` whose parts' matrices are ``matrices`` (in part order): the inverse of `matrix`.

    One matrix: reshaped (or transposed back, contiguous, for Conv1D); several: the row blocks, stacked.
    """
    if len(matrices) > 1:
        return torch.cat(matrices, dim=0)
    if kind.transposed:
        return matrices[0].t().contiguous()
    return matrices[0].reshape(shape)


def file_part(part: str | None, module: str, keys: set[str]) -> Part:
    """Where a delta record's matrix lives in a state dict with ``keys``: for a MultiheadAttention part,
    the packed ``<module>.in_proj_weight`` if the checkpoint has it, else ``<module>.<part>_weight``."""
    if not part:
        return Part("", "weight")
    if f"{module}.in_proj_weight" in keys:
        return Part(part, "in_proj_weight", MHA_PARTS.index(part))
    return Part(part, f"{part}_weight")


def unit_name(module: str, part: str) -> str:
    """A unit's name: the module's, or "<module>.<part>" for a part (e.g. "layers.0.self_attn.q_proj")."""
    return f"{module}.{part}" if part else module


def split_unit(name: str, part: str | None) -> str:
    """The module name of a unit named ``name`` with ``part`` (the inverse of `unit_name`)."""
    return name[: -len(part) - 1] if part else name
