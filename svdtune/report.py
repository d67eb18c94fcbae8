"""A table of what svdtune adapted and trains in a model, and of the bytes each adapted layer holds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import repeat

from torch import Tensor, nn

from svdtune import kinds, memory
from svdtune.layers import SpectralLayer
from svdtune.targets import count_kinds, describe_counts
from svdtune.walk import factor_ids

SKIPPED = "_svdtune_skipped"  # on the root model: {module name: class name} apply's patterns met but could not adapt

_HEADER = ("layer", "type", "weight shape", "rank", "mode", "trainable", "% of model")
_MEMORY_HEADER = ("layer", "device", "weight", "factors", "cached W'", "total", "on device")


@dataclass(frozen=True)
class LayerMemory:
    """The bytes one adapted layer holds.

    Attributes:
        weight: the frozen base weight W.
        factors: U, sigma and Vh (and the deltas).
        cached: the eval-mode cache of W' (0 when there is none now).
        device: where the factors are, e.g. "cpu", "cuda:0"; "cuda:0 (W offloaded)" when W is kept in CPU
            memory by `svdtune.set_memory`, "cuda:0 (W: cpu)" when W is elsewhere for another reason.
        on_device: the bytes held on the factors' device: the total less an offloaded W (on a CPU-only
            machine, what the layer would hold on an accelerator).
        cache: whether the layer caches its eval-mode W' (`svdtune.set_memory(cache_weights=...)`).
    """

    weight: int
    factors: int
    cached: int
    device: str
    on_device: int
    cache: bool = True

    @property
    def total(self) -> int:
        return self.weight + self.factors + self.cached


@dataclass(frozen=True)
class LayerRow:
    """One adapted layer (or fully trainable parameter) in a `Report`."""

    name: str
    type: str
    weight_shape: tuple[int, ...]
    rank: str  # "k/min(m,n)", or "full" for a fully trained parameter
    mode: str
    trainable: int
    memory: LayerMemory | None = None  # None for a fully trained parameter


@dataclass(frozen=True)
class MemoryTable:
    """`Report.memory`: ``str()`` is a table of the bytes each adapted layer holds, and their total."""

    rows: tuple[tuple[str, LayerMemory], ...]

    def total(self) -> LayerMemory:
        """The sums over all adapted layers (device: the devices, joined by ", ")."""
        devices = ", ".join(sorted({m.device for _, m in self.rows}))
        weight, factors, cached, on_device = (sum(getattr(m, f) for _, m in self.rows)
                                              for f in ("weight", "factors", "cached", "on_device"))
        return LayerMemory(weight, factors, cached, devices, on_device, all(m.cache for _, m in self.rows))

    def __str__(self) -> str:
        rows = [_memory_cells(name, m) for name, m in (*self.rows, ("total", self.total()))]
        lines = table_lines(_MEMORY_HEADER, rows)
        lines.insert(-1, lines[1])
        return "\n".join(lines)


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
        table = self.memory
        if table.rows:
            held = table.total()
            device = f"; on the device {format_bytes(held.on_device)}" if held.on_device != held.total else ""
            lines.append(f"held by the adapted layers: weights {format_bytes(held.weight)}, factors "
                         f"{format_bytes(held.factors)}, cached W' {_memory_cells('', held)[4]} ({held.device}){device}; "
                         "per layer: print(report.memory)")
        if self.skipped:
            counts = describe_counts(self.skipped)
            lines.append(f"not adapted (svdtune cannot adapt these kinds; matched by the targets, left frozen): {counts}")
        return "\n".join(lines)

    @property
    def memory(self) -> MemoryTable:
        """The bytes held per adapted layer: base weight, factors, cached W', and the device."""
        return MemoryTable(tuple((r.name, r.memory) for r in self.rows if r.memory is not None))


def _memory_cells(name: str, m: LayerMemory) -> tuple[str, ...]:
    cached = format_bytes(m.cached) if m.cache or m.cached else "off"  # "off": W' is not cached (set_memory)
    return (name, m.device, format_bytes(m.weight), format_bytes(m.factors), cached, format_bytes(m.total),
            format_bytes(m.on_device))


def format_bytes(count: int) -> str:
    """1536 -> "1.5 KiB"; binary units, three significant digits."""
    value, unit = float(count), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{count} B" if unit == "B" else f"{value:.3g} {unit}"


def table_lines(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns: the header, a rule of dashes, then one line per row."""
    columns = list(zip(header, *rows))
    widths = list(map(max, map(map, repeat(len), columns)))
    padded = [map(str.ljust, (cells[0], "-" * width, *cells[1:]), repeat(width)) for cells, width in zip(columns, widths)]
    return list(map(str.rstrip, map("  ".join, zip(*padded))))  # column by column in C: a file has a row per tensor


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.4f}%" if whole else "-"


def build_report(model: nn.Module) -> Report:
    """The rows for every svdtune layer and every other trainable parameter of ``model``."""
    rows, deltas = [], factor_ids(model)  # ids of svdtune's own parameters (factors, deltas): not the model's
    for name, module in model.named_modules():
        if isinstance(module, SpectralLayer):
            for part in module.spectral_parts():
                delta = module.spectral_delta(part)
                deltas.add(id(delta))
                matrix = module._matrix_shape(part)  # (no data read: a report on one rank of FSDP2 must not gather)
                shape = matrix if part else tuple(module.base_weight.shape)
                rows.append(LayerRow(
                    kinds.unit_name(name, part), module._spectral.original_class.__name__, shape,
                    f"{delta.numel()}/{min(matrix)}", module._spectral.config.mode,
                    delta.numel() if delta.requires_grad else 0, layer_memory(module, part),
                ))
    lazy = nn.parameter.UninitializedParameter  # a lazy module not yet run: no shape, no numbers yet
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in deltas:
            shape, count = ((), 0) if isinstance(param, lazy) else (tuple(param.shape), param.numel())
            rows.append(LayerRow(name, "parameter", shape, "full", "-", count))
    total = sum(p.numel() for p in model.parameters() if id(p) not in deltas and not isinstance(p, lazy))
    skipped = [cls for module in model.modules() for cls in module.__dict__.get(SKIPPED, {}).values()]
    return Report(tuple(rows), sum(r.trainable for r in rows), total, count_kinds(skipped))


def layer_memory(layer: SpectralLayer, part: str = "") -> LayerMemory:
    """What one unit of ``layer`` holds now: its base matrix, its factors and deltas, and the cached W' of its
    parameter (counted with the parameter's first part)."""
    state, unit = layer._spectral, layer._unit(part)
    factors, weight = layer._held_factors(part), layer._parameters[unit.part.param]
    first = layer._units_of(unit.part.param)[0][0] == part
    entry = state.cached.get(unit.part.param)
    device, offloaded = str(factors.U.device), memory.offloaded(layer)
    if offloaded or weight.device != factors.U.device:
        device += " (W offloaded)" if offloaded else f" (W: {weight.device})"
    held = {"weight": math.prod(layer._matrix_shape(part)) * weight.element_size(),
            "cached": _bytes(entry[2]) if entry is not None and first else 0,
            "factors": sum(_bytes(t) for t in (factors.U, factors.sigma, factors.Vh, layer.spectral_delta(part)))}
    on_device = held["factors"] + held["cached"] + (0 if offloaded else held["weight"])
    return LayerMemory(**held, device=device, on_device=on_device, cache=memory.caches(layer))


def _bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
