"""`megatron-opd bench rollout`'s smoke table: every (G, length) cell, both paths, their ratio,
and forward-token counts that follow O(length) with the cache and O(length^2) without."""

from __future__ import annotations

import re

from megatron_opd.cli import main as cli_main


def test_quick_table_has_every_cell_and_exact_forward_token_counts(capsys):
    assert cli_main(["bench", "rollout", "--quick"]) == 0
    out = capsys.readouterr().out
    for column in ("no-cache tok/s", "cache tok/s", "ratio", "CPU ratio", "no-cache fwd tokens", "cache fwd tokens", "same tokens"):
        assert column in out
    cell = re.compile(
        r"│\s*(\d+) │\s*(\d+) │\s*(\d+) │\s*([\d.]+) │\s*([\d.]+) │\s*([\d.]+)x │\s*[\d.]+x │\s*(\d+) │\s*(\d+) │\s*(\w+) │"
    )
    rows = [tuple(m.groups()) for line in out.splitlines() if (m := cell.search(line))]
    assert {(int(r[0]), int(r[2])) for r in rows} == {(1, 2), (1, 4), (2, 2), (2, 4)} and len(rows) == 4
    prompt_lens = set()
    for g, n, length, no_cache, cache, ratio, fed_no_cache, fed_cache, same in rows:
        g, n, length, fed_no_cache, fed_cache = int(g), int(n), int(length), int(fed_no_cache), int(fed_cache)
        assert n == 2 * g and same == "yes"
        assert abs(float(ratio) - float(cache) / float(no_cache)) <= 0.01 * float(ratio) + 0.01
        # One prefill of the (common) prompt length P, then one token per row per step ...
        assert fed_cache % n == 0
        p = fed_cache // n - length + 1
        prompt_lens.add(p)
        # ... against every step re-running the whole prefix.
        assert fed_no_cache == n * (length * p + length * (length - 1) // 2)
    assert len(prompt_lens) == 1 and prompt_lens.pop() > 1
