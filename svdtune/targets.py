"""Selecting layers by name: glob patterns over ``named_modules()`` names.

The rule: a pattern selects a module if it matches, with ``fnmatch`` rules
(case-sensitive; ``*`` also crosses dots), the module's qualified name or any
trailing dotted part of it. So ``"fc*"`` selects ``fc1`` and ``head.fc2``;
``"head.fc2"`` selects ``head.fc2`` and ``model.head.fc2``; ``"blocks.*.proj"``
selects ``blocks.0.proj`` and ``encoder.blocks.11.proj``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from svdtune.errors import SvdtuneError


def name_matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` matches ``name`` or a trailing dotted part of it."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def as_patterns(patterns: str | Iterable[str], what: str) -> tuple[str, ...]:
    """Accept one pattern or several; refuse anything else by name."""
    if isinstance(patterns, str):
        return (patterns,)
    if not isinstance(patterns, Iterable):
        raise SvdtuneError(f"{what} must be a glob pattern or a list of them, got {patterns!r}; e.g. {what}=['fc*'].")
    patterns = tuple(patterns)
    if not all(isinstance(p, str) and p for p in patterns):
        raise SvdtuneError(f"{what} must be non-empty glob patterns (strings), got {patterns!r}.")
    return patterns


def select(
    model: nn.Module,
    patterns: Sequence[str],
    exclude: Sequence[str],
    kinds: tuple[type[nn.Module], ...],
    what: str,
) -> dict[str, nn.Module]:
    """The modules of ``kinds`` that a pattern selects and no exclude pattern does.

    Raises:
        SvdtuneError: if a pattern or exclude pattern selects nothing of ``kinds``;
            the message lists similar module names.
    """
    named = [(name, module) for name, module in model.named_modules(remove_duplicate=False) if name]
    for pattern in (*patterns, *exclude):
        if not any(name_matches(name, pattern) and isinstance(m, kinds) for name, m in named):
            raise SvdtuneError(_no_match_message(model, named, pattern, kinds, what))
    return {
        name: module
        for name, module in named
        if isinstance(module, kinds)
        and any(name_matches(name, p) for p in patterns)
        and not any(name_matches(name, p) for p in exclude)
    }


def _no_match_message(model, named, pattern, kinds, what) -> str:
    kind_names = ", ".join(k.__name__ for k in kinds)
    matched = [f"{name} ({type(m).__name__})" for name, m in named if name_matches(name, pattern)]
    if matched:
        return (
            f"{what} pattern {pattern!r} matches only {', '.join(matched[:5])}, none of which is a "
            f"supported layer ({kind_names}); select the layers inside, e.g. {pattern + '.*'!r}."
        )
    candidates = [name for name, m in named if isinstance(m, kinds)]
    close = difflib.get_close_matches(pattern, candidates, n=5, cutoff=0.5) or candidates[:5]
    hint = f" Similar layer names: {', '.join(close)}." if close else " The model has no such layers."
    if not named and isinstance(model, kinds):
        hint = " The model itself is a single layer: wrap it, e.g. nn.Sequential(layer), and select '0'."
    return f"{what} pattern {pattern!r} selects no module.{hint}"
