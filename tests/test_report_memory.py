"""`Report.memory`: the bytes each adapted layer holds, against the tensors' own sizes."""

from __future__ import annotations

import torch
from torch import nn

import svdtune


def test_memory_counts_weight_factors_and_the_cached_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8)).to(torch.bfloat16)
    svdtune.apply(model, ["0", "2"], rank=6)
    before = dict(svdtune.report(model).memory.rows)
    (m, n), k = model[0].base_weight.shape, 6
    assert before["0"].weight == m * n * 2 and before["0"].cached == 0 and before["0"].device == "cpu"
    assert before["0"].factors == (m * k + k * n) * 2 + k * 4 + k * 2  # U, Vh, deltas in bf16; sigma in float32
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 32, dtype=torch.bfloat16))
    report = svdtune.report(model)
    after = dict(report.memory.rows)
    assert after["0"].cached == m * n * 2 and after["2"].cached == 8 * 48 * 2
    total = report.memory.total()
    assert total.weight == (m * n + 8 * 48) * 2 and total.total == sum(r.total for r in after.values())
    assert "cached W'" in str(report.memory) and "print(report.memory)" in str(report)
