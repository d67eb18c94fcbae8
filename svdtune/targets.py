"""Selecting layers by name: glob patterns over ``named_modules()`` names.

The rule: a pattern selects a module if it matches, with ``fnmatch`` rules
(case-sensitive; ``*`` also crosses dots), the module's qualified name or any
trailing dotted part of it. So ``"fc*"`` selects ``fc1`` and ``head.fc2``;
``"head.fc2"`` selects ``head.fc2`` and ``model.head.fc2``; ``"blocks.*.proj"``
selects ``blocks.0.proj`` and ``encoder.blocks.11.proj``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from svdtune import kinds
from svdtune.errors import SvdtuneError


def name_matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` matches ``name`` or a trailing dotted part of it."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def as_patterns(patterns: str | Iterable[str], what: str) -> tuple[str, ...]:
    """Accept one pattern or several; refuse anything else by name."""
    if isinstance(patterns, str):
        return (patterns,)
    wrong = SvdtuneError(f"{what} must be a glob pattern or a list of them, got {patterns!r:.80}; e.g. {what}=['fc*'].")
    if not isinstance(patterns, Iterable):
        raise wrong
    try:
        patterns = tuple(patterns)
    except TypeError:  # iterable by type only, e.g. a 0-d tensor
        raise wrong from None
    if not all(isinstance(p, str) and p for p in patterns):
        raise SvdtuneError(f"{what} must be non-empty glob patterns (strings), got {patterns!r}.")
    return patterns


def select(
    model: nn.Module,
    patterns: Sequence[str],
    exclude: Sequence[str],
    accepts: Callable[[nn.Module], bool] = kinds.is_supported,
    what: str = "targets",
) -> dict[str, nn.Module]:
    """The modules ``accepts`` takes that a pattern selects and no exclude pattern excludes.

    An exclude pattern excludes the modules it matches and everything inside them.

    Raises:
        SvdtuneError: a pattern selects nothing ``accepts`` takes, or an exclude pattern
            matches no module at all; the message says why and lists names similar to the pattern.
    """
    named = [(name, module) for name, module in model.named_modules(remove_duplicate=False) if name]
    for pattern in patterns:
        if not any(name_matches(name, pattern) and accepts(m) for name, m in named):
            raise SvdtuneError(_no_match_message(model, named, pattern, accepts, what))
    for pattern in exclude:
        if not any(name_matches(name, pattern) for name, _ in named):
            similar = _similar(pattern, [name for name, _ in named])
            hint = f" Similar module names: {', '.join(similar)}." if similar else ""
            raise SvdtuneError(f"exclude pattern {pattern!r} matches no module of the model.{hint}")
    return {
        name: module
        for name, module in named
        if accepts(module) and any(name_matches(name, p) for p in patterns) and not excluded(name, exclude)
    }


def excluded(name: str, exclude: Sequence[str]) -> bool:
    """True if an exclude pattern matches the module ``name`` or a module it is inside."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(name_matches(prefix, p) for prefix in prefixes for p in exclude)


def unadaptable(model: nn.Module, patterns: Sequence[str], exclude: Sequence[str]) -> dict[str, str]:
    """{name: class name} of the modules the patterns select (not excluded) that svdtune cannot adapt:
    modules with parameters of their own, of no supported kind and with no supported layer inside."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or kinds.is_supported(module) or not any(p is not None for p in module._parameters.values()):
            continue
        if not any(name_matches(name, p) for p in patterns) or excluded(name, exclude):
            continue
        if not any(kinds.is_supported(inner) for inner in module.modules()):
            found[name] = type(module).__name__
    return found


def count_kinds(classes: Iterable[str]) -> dict[str, int]:
    """Class names -> {class name: count}."""
    counts: dict[str, int] = {}
    for name in classes:
        counts[name] = counts.get(name, 0) + 1
    return counts


def describe_counts(counts: dict[str, int]) -> str:
    """{"LayerNorm": 3, "LSTM": 1} -> "3 LayerNorm, 1 LSTM" (most frequent first)."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _no_match_message(model, named, pattern, accepts, what) -> str:
    matched = [(name, m) for name, m in named if name_matches(name, pattern)]
    shown = ", ".join(f"{name} ({type(m).__name__})" for name, m in matched[:5])
    if matched and any(accepts(inner) for _, m in matched for inner in m.modules()):
        return (f"{what} pattern {pattern!r} matches only {shown}, which svdtune does not adapt itself; "
                f"select the layers inside, e.g. {pattern + '.*'!r}.")
    if matched:
        return (f"{what} pattern {pattern!r} matches only {shown}, of a kind svdtune does not adapt and with no "
                f"such layers inside (it adapts {kinds.supported_names()}); train it fully with "
                f"trainable=[{pattern!r}] instead, or leave it out.")
    similar = _similar(pattern, [name for name, m in named if accepts(m)])
    hint = f" Similar layer names: {', '.join(similar)}." if similar else ""
    if not named and accepts(model):
        hint = " The model itself is a single layer: wrap it, e.g. nn.Sequential(layer), and select '0'."
    return f"{what} pattern {pattern!r} selects no module.{hint}"


def _similar(pattern: str, names: list[str], count: int = 5, cutoff: float = 0.6) -> list[str]:
    """Up to ``count`` of ``names`` most similar to ``pattern`` (ignoring its wildcards), best first;
    a name is compared whole and by each trailing dotted part, as patterns match; none below ``cutoff``."""
    text = "".join(c for c in pattern if c not in "*?[]")

    def score(name: str) -> float:
        parts = name.split(".")
        tails = (".".join(parts[i:]) for i in range(len(parts)))
        return max(difflib.SequenceMatcher(None, text, tail).ratio() for tail in tails)

    scored = sorted(((score(name), name) for name in names), key=lambda item: -item[0])
    return [name for value, name in scored if value >= cutoff][:count]
