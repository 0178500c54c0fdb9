"""The teacher wire benchmark in quick mode: every row measured, sizes where the formats put them."""

from __future__ import annotations

import json

from megatron_opd.teachers import bench


def test_quick_benchmark_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(rows) == [c.name for c in bench.CASES]
    printed = capsys.readouterr().out
    assert all(name in printed for name in rows) and "hidden size 4096" in printed
    base = rows[bench.BASELINE]
    assert base["bytes_ratio"] == 1.0 and base["rtt_ratio"] == 1.0
    assert all(r["rtt_ms"] > 0 and r["bytes_per_token"] > 0 for r in rows.values())
    # Hidden states: every one of the 16 + 48 positions comes back, 4096 values each.
    rows_per_token = (16 + 48) / 48
    assert abs(rows["hidden, binary fp32"]["bytes_per_token"] / (4 * 4096 * rows_per_token) - 1) < 0.01
    assert abs(rows["hidden, binary fp16"]["bytes_per_token"] / (2 * 4096 * rows_per_token) - 1) < 0.01
    assert base["bytes_per_token"] > 4 * rows["hidden, binary fp32"]["bytes_per_token"]  # JSON floats cost > 16 bytes
    for k in (8, 64):
        nested, b64, binary = (rows[f"top-{k}, {f}"]["bytes_per_token"] for f in ("nested JSON", "flat base64", "binary"))
        assert nested > 2 * b64 > 2 * binary
    assert rows["top-64, binary"]["bytes_per_token"] > 4 * rows["top-8, binary"]["bytes_per_token"]
    assert rows["sampled, JSON"]["bytes_per_token"] < rows["top-8, binary"]["bytes_per_token"]
