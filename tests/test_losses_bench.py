"""The benchmark's smoke table: every variant measured, with its ratios to the naive baseline."""

from __future__ import annotations

import re

import torch

from megatron_opd.losses import bench


def test_quick_table_has_every_row_and_ratio_column(capsys):
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for column in ("time / naive", "CPU / naive", "memory / naive", "peak extra (MiB)"):
        assert column in out
    measured = bench.variants_for(torch.device("cpu"))
    assert bench.NAIVE in measured and bench.FUSED in measured  # the torch-ops rows are CUDA-only
    rows = {name: line for line in out.splitlines() for name in measured if name in line}
    assert set(rows) == set(measured)
    # The baseline's ratios to itself are exactly one; every other row has numeric ratios.
    ratios = r"\s+│\s+".join([r"([\d.]+)x", r"[\d.]+", r"([\d.]+)x", r"[\d.]+", r"([\d.]+)"])
    for name, line in rows.items():
        found = re.search(ratios, line)
        assert found, line
        if name == bench.NAIVE:
            assert [float(x) for x in found.groups()] == [1.0, 1.0, 1.0]
