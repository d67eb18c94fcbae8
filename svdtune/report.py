"""A table of what svdtune adapted and trains in a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from svdtune import kinds
from svdtune.layers import SpectralLayer
from svdtune.targets import count_kinds, describe_counts

SKIPPED = "_svdtune_skipped"  # on the root model: {module name: class name} apply's patterns met but could not adapt

_HEADER = ("layer", "type", "weight shape", "rank", "mode", "trainable", "% of model")


@dataclass(frozen=True)
class LayerRow:
    """One adapted layer (or fully trainable parameter) in a `Report`."""

    name: str
    type: str
    weight_shape: tuple[int, ...]
    rank: str  # "k/min(m,n)", or "full" for a fully trained parameter
    mode: str
    trainable: int


@dataclass(frozen=True)
class Report:
    """What `svdtune.report` returns; ``str(report)`` is the table.

    Attributes:
        rows: one per adapted layer, then one per fully trainable parameter.
        trainable: numbers the optimizer trains (deltas plus trainable modules).
        total: parameters of the base model (deltas not counted).
        skipped: {class name: count} of modules `apply`'s patterns matched but svdtune cannot
            adapt (with parameters of their own and no supported layer inside), left frozen.
    """

    rows: tuple[LayerRow, ...]
    trainable: int
    total: int
    skipped: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        rows = [
            (r.name, r.type, "x".join(map(str, r.weight_shape)), r.rank, r.mode, f"{r.trainable:,}", _percent(r.trainable, self.total))
            for r in self.rows
        ]
        rows.append(("total", "", "", "", "", f"{self.trainable:,}", _percent(self.trainable, self.total)))
        lines = table_lines(_HEADER, rows)
        lines.insert(-1, lines[1])  # a rule above the total too
        if self.skipped:
            counts = describe_counts(self.skipped)
            lines.append(f"not adapted (svdtune cannot adapt these kinds; matched by the targets, left frozen): {counts}")
        return "\n".join(lines)


def table_lines(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns: the header, a rule of dashes, then one line per row."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    cells = [header, tuple("-" * w for w in widths), *rows]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.4f}%" if whole else "-"


def build_report(model: nn.Module) -> Report:
    """The rows for every svdtune layer and every other trainable parameter of ``model``."""
    rows, deltas = [], set()
    for name, module in model.named_modules():
        if isinstance(module, SpectralLayer):
            for part in module.spectral_parts():
                delta = module.spectral_delta(part)
                deltas.add(id(delta))
                matrix = module.base_matrix(part)
                shape = tuple(matrix.shape) if part else tuple(module.base_weight.shape)
                rows.append(LayerRow(
                    kinds.unit_name(name, part), module._spectral.original_class.__name__, shape,
                    f"{delta.numel()}/{min(matrix.shape)}", module._spectral.config.mode,
                    delta.numel() if delta.requires_grad else 0,
                ))
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in deltas:
            rows.append(LayerRow(name, "parameter", tuple(param.shape), "full", "-", param.numel()))
    total = sum(p.numel() for p in model.parameters() if id(p) not in deltas)
    skipped = [cls for module in model.modules() for cls in module.__dict__.get(SKIPPED, {}).values()]
    return Report(tuple(rows), sum(r.trainable for r in rows), total, count_kinds(skipped))
