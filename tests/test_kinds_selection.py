"""What selection says: unsupported kinds, what "*" skips, exclude patterns and similar names (issue 12, items 1-3)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import svdtune
from kinds_reference import assert_same_state, state
from svdtune.errors import SvdtuneError


class Mixed(nn.Module):
    """Supported layers next to kinds svdtune cannot adapt (LSTM, BatchNorm2d) and parameterless ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.rnn = nn.LSTM(4, 5)
        self.block = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 2)


def apply_quietly(model, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svdtune.apply(model, *args, **kwargs)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("pattern, kind", [("rnn", "LSTM"), ("norm", "BatchNorm2d")])
def test_a_leaf_of_an_unsupported_kind_is_named_with_what_to_do_instead(pattern, kind):
    model = Mixed()
    before = state(model)
    with pytest.raises(SvdtuneError) as info:
        svdtune.apply(model, pattern)
    message = str(info.value)
    assert f"{pattern} ({kind}), of a kind svdtune does not adapt" in message
    assert f"trainable=[{pattern!r}]" in message and "select the layers inside" not in message
    assert_same_state(model, before)


def test_a_container_with_supported_layers_inside_suggests_them():
    with pytest.raises(SvdtuneError, match=r"matches only block \(Sequential\), which svdtune does not adapt itself; "
                                           r"select the layers inside, e.g. 'block\.\*'"):
        svdtune.apply(Mixed(), "block")
    model = Mixed()
    svdtune.apply(model, "block.*")  # the suggestion works
    assert [row.name for row in svdtune.report(model).rows] == ["block.0"]


def test_star_warns_once_with_kinds_and_counts_and_report_lists_them():
    model = Mixed()
    messages = apply_quietly(model, "*")
    assert len(messages) == 1
    assert "3 modules svdtune cannot adapt, left frozen: 1 BatchNorm1d, 1 BatchNorm2d, 1 LSTM" in messages[0]
    report = svdtune.report(model)
    assert report.skipped == {"BatchNorm1d": 1, "BatchNorm2d": 1, "LSTM": 1}
    assert str(report).splitlines()[-1].endswith("1 BatchNorm1d, 1 BatchNorm2d, 1 LSTM")
    svdtune.restore(model)
    assert svdtune.report(model).skipped == {}


def test_trainable_and_excluded_modules_are_not_reported_as_skipped():
    model = Mixed()
    messages = apply_quietly(model, "*", exclude="block", trainable="rnn")
    assert messages and "left frozen: 1 BatchNorm2d;" in messages[0]
    assert apply_quietly(Mixed(), ["fc1", "conv"]) == []  # named layers only: nothing skipped, no warning


def test_star_matching_only_unsupported_kinds_says_so():
    model = nn.Sequential(nn.LSTM(4, 5), nn.LayerNorm(5), nn.Linear(5, 5))
    with pytest.raises(SvdtuneError, match=r"leaves no layer to adapt; it matches only modules svdtune cannot adapt "
                                           r"\(1 LSTM, 1 LayerNorm\)"):
        svdtune.apply(model, "*", exclude="2")
    with pytest.raises(SvdtuneError, match=r"matches only 0 \(LSTM\), 1 \(LayerNorm\), of a kind svdtune does not"):
        svdtune.apply(model[:2], "*")


def test_excluding_a_container_excludes_everything_inside():
    model = Mixed()
    apply_quietly(model, "*", exclude=["block", "rnn"])
    assert [row.name for row in svdtune.report(model).rows] == ["conv", "fc1", "fc2"]


def test_exclude_errors_name_the_exclude_pattern_and_similar_names_only():
    model = Mixed()
    with pytest.raises(SvdtuneError) as info:
        svdtune.apply(model, "*", exclude="nonexistent_xyz")
    message = str(info.value)
    assert message.startswith("exclude pattern 'nonexistent_xyz' matches no module") and "Similar" not in message
    with pytest.raises(SvdtuneError, match=r"exclude pattern 'fc3' .* Similar module names: fc1, fc2\."):
        svdtune.apply(model, "*", exclude="fc3")


def test_similar_names_are_ranked_by_similarity_not_by_position():
    model = nn.Sequential()
    for i in range(8):
        model.add_module(f"layer{i}", nn.Linear(2, 2))
    model.add_module("decoder", nn.Sequential())
    model.decoder.add_module("conv_out", nn.Conv1d(2, 2, 1))
    with pytest.raises(SvdtuneError, match=r"'conv_outt' selects no module\. Similar layer names: decoder\.conv_out\.$"):
        svdtune.apply(model, "conv_outt")
    with pytest.raises(SvdtuneError) as info:
        svdtune.apply(model, "qkv")
    assert str(info.value) == "targets pattern 'qkv' selects no module."


def test_a_module_skipped_by_two_calls_is_counted_once():
    model = Mixed()
    apply_quietly(model, "*", exclude=["fc*", "block"])
    apply_quietly(model, "*", exclude="conv")
    assert svdtune.report(model).skipped == {"BatchNorm1d": 1, "BatchNorm2d": 1, "LSTM": 1}
