"""`megatron-opd bench steps` (stages/bench.py): one SFT, one GRPO and one OPD step of the same
model and rows, each a real `megatron-opd train` job (OPD against a real teacher server), in one
table with the train tokens/s and the rollout and scoring time beside them."""

from __future__ import annotations

import re

from megatron_opd.cli import main as cli_main


def test_quick_table_has_the_three_stages_with_their_extra_work(capsys):
    assert cli_main(["bench", "steps", "--quick", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("One optimizer step: SFT vs GRPO vs OPD") :]
    for column in ("tokens/step", "train tok/s", "train s", "rollout s", "scoring s", "step tok/s", "train share"):
        assert column in table, column
    num = r"\s*([\d.]+|-)\s*"
    row = re.compile(rf"│ (SFT|GRPO|OPD)\s*│{num}│{num}│{num}│{num}│{num}│{num}│\s*(\d+)%\s*│")
    rows = {m.group(1): m.groups()[1:] for line in table.splitlines() if (m := row.search(line))}
    assert sorted(rows) == ["GRPO", "OPD", "SFT"], table
    tokens = {name: float(r[0]) for name, r in rows.items()}
    assert len(set(tokens.values())) == 1 and tokens["SFT"] > 0  # the same batch shape: 8 rows x max_seq_len
    sft = rows["SFT"]
    assert sft[3] == "-" and sft[4] == "-" and sft[6] == "100"  # SFT has no rollout, no scoring
    for name in ("GRPO", "OPD"):
        _, train_tps, train_s, rollout_s, score_s, step_tps, share = rows[name]
        assert float(train_tps) > 0 and float(train_s) > 0 and float(rollout_s) > 0 and float(score_s) > 0
        assert float(step_tps) < float(train_tps) and int(share) < 100  # the extra work costs time
