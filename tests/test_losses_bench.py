"""The benchmark's smoke table: every variant measured, with its ratios to the naive baseline."""

from __future__ import annotations

import re

from megatron_opd.losses import bench


def test_quick_table_has_every_row_and_ratio_column(capsys):
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for column in ("time / naive", "memory / naive", "peak extra (MiB)"):
        assert column in out
    rows = {name: line for line in out.splitlines() for name in bench.VARIANTS if name in line}
    assert set(rows) == set(bench.VARIANTS)
    # The baseline's ratios to itself are exactly one; every other row has numeric ratios.
    assert re.search(r"1\.00x\s+│\s+[\d.]+\s+│\s+1\.000", rows[bench.NAIVE])
    for name, line in rows.items():
        assert re.search(r"[\d.]+x\s+│\s+[\d.]+\s+│\s+[\d.]+\s+│", line), line
