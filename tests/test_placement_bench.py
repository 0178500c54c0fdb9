"""`megatron-opd bench placement` in quick mode: the default job's OPD step with served and with
in-job teachers (and without prefetch), every column filled from the runs' own metrics. The two
placements train the same job from the same seed with signals equal to 1e-5, so the runs' last
reverse KL must agree: the table compares like with like. No timing is asserted."""

from __future__ import annotations

import json

from megatron_opd.stages import placement_bench


def test_quick_placement_benchmark_table(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert placement_bench.main(["--quick", "--json", str(out)]) == 0
    rows = {r["case"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["server", "in-job", "in-job, no prefetch"]
    printed = capsys.readouterr().out
    assert all(case in printed for case in rows) and "served vs in-job" in printed
    server, in_job, serial = rows["server"], rows["in-job"], rows["in-job, no prefetch"]
    for r in rows.values():
        assert r["step_s"] > 0 and r["rollout_s"] > 0 and r["teacher_s"] > 0 and r["train_s"] > 0
        assert abs(r["step_s"] - (r["rollout_s"] + r["teacher_s"] + r["train_s"])) < 1e-9
    assert server["loads"] == 0 and server["forward_s"] == 0 and server["read_s"] == 0
    # Three teachers, one resident: each step after the first loads the two it does not hold.
    assert in_job["loads"] == serial["loads"] == 2
    assert in_job["forward_s"] > 0 and in_job["read_s"] > 0 and serial["read_s"] > 0
    assert serial["load_wait_s"] >= serial["read_s"] * 0.99  # without prefetch every read is waited for
    for r in (in_job, serial):
        assert abs(r["kl"] - server["kl"]) <= 1e-4 * abs(server["kl"]), (r["kl"], server["kl"])
