"""`megatron-opd bench placement` in quick mode: the default job's OPD step with served and with
in-job teachers (and without prefetch), every column filled from the runs' own metrics. The two
placements train the same job from the same seed with signals equal to 1e-5, so the runs' last
reverse KL must agree: the table compares like with like. No timing is asserted."""

from __future__ import annotations

import json

import pytest

from megatron_opd.stages import placement_bench


@pytest.mark.slow  # four training runs and three teacher servers: minutes on 2 cores
def test_quick_placement_benchmark_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert placement_bench.main(["--quick", "--json", str(out)]) == 0
    rows = {r["case"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["server", "in-job", "in-job, no prefetch", "GRPO, no reference"]
    printed = capsys.readouterr().out
    with capsys.disabled():
        print(printed)
    # rich wraps the title and the cells to the table's width: look for the words
    assert all(word in printed for case in rows for word in case.split()) and "in-job teachers" in printed
    server, in_job, serial, grpo = (rows[c] for c in ("server", "in-job", "in-job, no prefetch", "GRPO, no reference"))
    for r in rows.values():
        assert r["step_s"] > 0 and r["rollout_s"] > 0 and r["teacher_s"] >= 0 and r["train_s"] > 0
        assert abs(r["step_s"] - (r["rollout_s"] + r["teacher_s"] + r["train_s"])) < 1e-9
    assert grpo["loads"] == 0 and grpo["forward_s"] == 0 and grpo["kl"] != grpo["kl"]  # no teacher, no KL
    assert server["teacher_s"] > 0 and in_job["teacher_s"] > 0
    assert server["loads"] == 0 and server["forward_s"] == 0 and server["read_s"] == 0
    # Three teachers, one resident: each step after the first loads the two it does not hold.
    assert in_job["loads"] == serial["loads"] == 2
    assert in_job["forward_s"] > 0 and in_job["read_s"] > 0 and serial["read_s"] > 0
    assert serial["load_wait_s"] >= serial["read_s"] * 0.99  # without prefetch every read is waited for
    for r in (in_job, serial):
        assert abs(r["kl"] - server["kl"]) <= 1e-4 * abs(server["kl"]), (r["kl"], server["kl"])
