"""The GRM's trainer-side pieces (issue 14) against hand-computed cases: the rubric task, the
hidden oracle's isolation, the annotation file, the verdict parser, the judge-RL reward (a
constant verdict earns nothing), voting with shuffled rubrics."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opd.data.rubric import (
    Annotation,
    JudgeTemplate,
    annotation_baselines,
    RubricTasks,
    judge_prompt,
    load_annotations,
    verdict_text,
    write_annotations,
)
from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.rewards.grm import (
    FormatFailure,
    GRMReward,
    JudgeAgreement,
    Verdict,
    aggregate,
    pairwise_reward,
    parse_verdict,
    vote_orders,
)
from megatron_opd.rewards.base import reward_inputs
from megatron_opd.rewards.registry import get_reward
from megatron_opd.rewards.types import RewardInput, RewardError

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_opd"
# The only modules allowed to import the hidden oracle: the annotation maker (inside the oracle's
# package) and the evaluator.
ORACLE_IMPORTERS = {"megatron_opd.grm_oracle.annotate", "megatron_opd.grm_oracle.oracle", "megatron_opd.grm_oracle.reward",
                    "megatron_opd.stages.grm_eval"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def test_only_the_annotation_maker_and_the_evaluator_import_the_oracle():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            # The oracle, or the evaluator that carries it.
            if any(n == "megatron_opd.grm_oracle" or n.startswith(("megatron_opd.grm_oracle.", "megatron_opd.stages.grm_eval"))
                   for n in names):  # fmt: skip
                importers.add(_module_name(path))
    assert importers, "the annotation maker imports the oracle: the scan found nothing, so it is broken"
    assert importers <= ORACLE_IMPORTERS, f"training code imports the hidden oracle: {sorted(importers - ORACLE_IMPORTERS)}"


def test_only_the_oracle_baseline_names_the_oracle_and_only_in_its_branch():
    """Training code reaches the oracle by name in one place: the oracle baseline's reward
    (grm.policy_reward=oracle) in stages/grm.py; nothing else imports it by name either."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path) in ORACLE_IMPORTERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and "grm_oracle" in str(a.value) for a in node.args):
                calls.append((_module_name(path), node.args[0].value))
    assert calls == [("megatron_opd.stages.grm", "megatron_opd.grm_oracle.reward")], calls


def test_the_trainer_side_runs_with_the_oracle_unreachable(tmp_path):
    """Annotations are made with the oracle; then, in a process where importing it fails, the
    trainer's side reads them, builds judge prompts and scores verdicts."""
    path = _annotation_file(tmp_path, 60)
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[:2] == ['megatron_opd', 'grm_oracle']:
            raise ImportError('the hidden oracle is unreachable from training')
sys.meta_path.insert(0, Block())
from megatron_opd.data.rubric import load_annotations, judge_prompt, JudgeTemplate, RubricTasks
from megatron_opd.data.rubric import annotation_baselines
from megatron_opd.rewards.registry import get_reward
from megatron_opd.rewards.base import score_responses
import megatron_opd.rewards, megatron_opd.data, megatron_opd.stages.trainer
s = load_annotations({str(path)!r})
b = annotation_baselines(s.items).to_json()
prompts = [judge_prompt(a, JudgeTemplate(), baseline=b) for a in s.items]
r = score_responses(prompts, [p.metadata['target'] for p in prompts], {{'judge': get_reward('judge_agreement')}})
assert all(x.score > -1 for x in r)
try:
    import megatron_opd.grm_oracle.oracle
except ImportError:
    print('blocked')
print(len(r))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["blocked", "60"]


# -- the task and the oracle ----------------------------------------------------------------------


def test_rubric_task_is_deterministic_and_keeps_held_out_prompts_apart():
    a, b = RubricTasks(seed=3, eval_size=50), RubricTasks(seed=3, eval_size=50)
    assert [p.text for p in a.prompts(0, 20)] == [p.text for p in b.prompts(0, 20)]
    held = {p.text for p in a.eval_prompts("rubric")}
    assert len(held) == 50
    assert not held & {p.text for p in a.prompts(0, 500)}
    p = a.prompt(7)
    assert p.text == f"w:{p.metadata['query']}|{p.metadata['rubric']}=" and p.domain == "rubric"
    assert a.reward_name("rubric") == "grm"


def test_oracle_scores_hand_computed_cases():
    from megatron_opd.grm_oracle import oracle

    # query "bdfh"; codes 1 (only set letters, w3), 3 (ascending, w2), 5 (length 4, w2)
    assert oracle.verdicts("bdfh", "135", "bdfh") == (1, 1, 1)
    assert oracle.score("bdfh", "135", "bdfh") == 1.0
    assert oracle.verdicts("bdfh", "135", "hfdb") == (1, 0, 1)  # descending
    assert oracle.score("bdfh", "135", "hfdb") == pytest.approx(5 / 7)
    assert oracle.verdicts("bdfh", "246", "bbz") == (0, 1, 0)  # repeat, starts with b, 2 distinct
    assert oracle.verdicts("bdfh", "123456", "") == (0,) * 6
    assert oracle.score_digit(5 / 7) == 6


# -- annotations ----------------------------------------------------------------------------------


def _annotation_file(tmp_path: Path, n: int, noise: float = 0.1) -> Path:
    from megatron_opd.data.rubric import random_response
    from megatron_opd.grm_oracle.annotate import make_annotation_file
    import random

    tasks = RubricTasks(seed=0, eval_size=10)
    rng = random.Random(0)
    items = []
    for p in tasks.prompts(0, n):
        items.append((p.sample_id, p.metadata["query"], p.metadata["rubric"], random_response(rng, p.metadata["query"])))
    path = tmp_path / "annotations.jsonl"
    make_annotation_file(path, items, noise=noise, seed=1)
    return path


def test_annotation_file_is_written_once_with_noise_and_its_sha256(tmp_path):
    import hashlib

    from megatron_opd.grm_oracle import oracle
    from megatron_opd.grm_oracle.annotate import make_annotation_file

    path = _annotation_file(tmp_path, 200)
    s = load_annotations(path)
    assert len(s) == 200 and s.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    flips = sum(v != t for a in s.items for v, t in zip(a.verdicts, oracle.verdicts(a.query, a.rubric, a.response)))
    assert 0.05 < flips / 600 < 0.16  # noise 0.1 per verdict
    with pytest.raises(FileExistsError, match="made once"):
        make_annotation_file(path, [("x", "abcd", "123", "ab")], noise=0.1, seed=1)
    clean = _annotation_file(tmp_path / "clean", 50, noise=0.0)
    for a in load_annotations(clean).items:
        assert a.verdicts == oracle.verdicts(a.query, a.rubric, a.response)
        assert a.score == oracle.score_digit(oracle.score(a.query, a.rubric, a.response))


def test_bad_annotation_files_are_refused_naming_the_line_and_field(tmp_path):
    good = {"id": "a", "query": "bdfh", "rubric": "135", "response": "bd", "verdicts": [1, 1, 0], "score": 5}
    path = tmp_path / "a.jsonl"
    bad = dict(good, id="b")
    del bad["score"]
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:2: annotation has no 'score' field"):
        load_annotations(path)
    path.write_text(json.dumps(dict(good, verdicts=[1, 1])) + "\n")
    with pytest.raises(ValueError, match=r":1: field 'verdicts' \[1, 1\] must be one 0 or 1 per rubric code"):
        load_annotations(path)
    path.write_text(json.dumps(dict(good, score=10)) + "\n")
    with pytest.raises(ValueError, match=r"field 'score' 10 must be an integer in 0..9"):
        load_annotations(path)
    path.write_text("")
    with pytest.raises(ValueError, match=r"holds 0 annotations; at least 1 are needed \(B >= 1\)"):
        load_annotations(path)
    path.write_text(json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"holds 1 annotations; at least 50"):
        load_annotations(path, min_size=50)
    with pytest.raises(ValueError, match="does not exist"):
        load_annotations(tmp_path / "missing.jsonl")
    from megatron_opd.grm_oracle.annotate import make_annotation_file

    with pytest.raises(ValueError, match=r"annotations_size=0.*B >= 1"):
        make_annotation_file(tmp_path / "none.jsonl", [], noise=0.1, seed=0)
    with pytest.raises(FileExistsError):
        write_annotations(path, [])


def test_judge_template_the_tokenizer_cannot_encode_is_refused():
    tok = CharTokenizer()
    JudgeTemplate().check(tok)
    with pytest.raises(ValueError, match=r"grm.judge_template='J\[\{query\}.*cannot encode.*'J'"):
        JudgeTemplate("J[{query}|{rubric}:{response}>").check(tok)
    with pytest.raises(ValueError, match=r"must contain \{response\} exactly once"):
        JudgeTemplate("j:{query}|{rubric}>").check(tok)
    with pytest.raises(ValueError, match=r"unknown fields \['answer'\]"):
        JudgeTemplate("j:{query}|{rubric}:{response}{answer}>").check(tok)


# -- the verdict parser ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("101,6", Verdict((1, 0, 1), 6)),
        ("000,0", Verdict((0, 0, 0), 0)),
        ("10,6", "2 verdicts"),  # malformed: too few
        ("1011,6", "4 verdicts"),
        ("1x1,6", "not a verdict"),
        ("101;6", "not a verdict"),
        ("101,", "truncated"),  # truncated
        ("10", "truncated"),
        ("", "truncated"),
        ("101,6 ok", "not a verdict"),  # extra text
        ("ok 101,6", "not a verdict"),
        ("101,66", "not a verdict"),
    ],
)
def test_parse_verdict(text, expected):
    got = parse_verdict(text, 3)
    if isinstance(expected, Verdict):
        assert got == expected
    else:
        assert isinstance(got, FormatFailure) and expected in got.reason


# -- the judge-RL reward --------------------------------------------------------------------------

# A hand-made annotation set: rubric "12" everywhere. Code 1 labels [1, 1, 1, 0] (p = 3/4, base
# 3/4, majority 1), code 2 labels [0, 1, 0, 0] (p = 1/4, base 3/4, majority 0); scores
# [2, 4, 6, 8] (median 5, d0 = (3 + 1 + 1 + 3) / 4 = 2).
HAND = [
    Annotation("a", "abcd", "12", "ab", (1, 0), 2),
    Annotation("b", "abcd", "12", "ba", (1, 1), 4),
    Annotation("c", "abcd", "12", "cc", (1, 0), 6),
    Annotation("d", "abcd", "12", "zz", (0, 0), 8),
]


def _samples(items, responses):
    base = annotation_baselines(items).to_json()
    prompts = [judge_prompt(a, JudgeTemplate(), baseline=base) for a in items]
    return reward_inputs(prompts, responses)


def test_judge_reward_hand_computed():
    base = annotation_baselines(HAND)
    assert base.criterion == {"1": 0.75, "2": 0.75} and base.score_distance == 2 and base.median_score == 5
    reward = get_reward("judge_agreement")
    # The labels themselves: items (1 - 3/4) each, score (2 - 0) / 9: 0.5 * 0.25 + 0.5 * 2 / 9.
    exact = reward.score(_samples(HAND, [verdict_text(a.verdicts, a.score) for a in HAND]))
    assert [r.score for r in exact] == pytest.approx([0.125 + 1 / 9] * 4)
    # "a" (labels 10, 2) judged "01,9": items (0 - 3/4 + 0 - 3/4) / 2, score (2 - 7) / 9.
    r = reward.score(_samples(HAND, ["01,9", "11,4", "10,6", "00,8"]))[0]
    assert r.score == pytest.approx(0.5 * -0.75 + 0.5 * -5 / 9)
    # "b" (labels 11, 4) judged "10,6": items (1 - 3/4 + 0 - 3/4) / 2, score (2 - 2) / 9.
    r = reward.score(_samples(HAND, ["01,9", "10,6", "10,6", "00,8"]))[1]
    assert r.score == pytest.approx(0.5 * -0.25)
    assert r.info == {"format_failure": False, "criterion_agreement": 0.5, "score_error": 2}
    bad = reward.score(_samples(HAND, ["01,", "11,4 x", "1,6", "00,8"]))
    assert [x.score for x in bad[:3]] == [-1.0] * 3 and all(x.info["format_failure"] for x in bad[:3])
    assert JudgeAgreement(format_reward=-2.0).score(_samples(HAND[:1], ["0"]))[0].score == -2.0


def test_a_constant_verdict_earns_nothing():
    reward = get_reward("judge_agreement")
    best_constant = "10,5"  # majority label per code, the median score
    for constant in (best_constant, "11,5", "00,0", "11,9", "10,4"):
        mean = sum(r.score for r in reward.score(_samples(HAND, [constant] * 4))) / 4
        assert mean <= 1e-12, constant
        if constant == best_constant:
            assert mean == pytest.approx(0.0)
    # A judge that reads the responses earns more than any constant.
    exact = reward.score(_samples(HAND, [verdict_text(a.verdicts, a.score) for a in HAND]))
    assert min(r.score for r in exact) > 0
    # Pairwise: a constant verdict ties, which earns nothing; a strict right order earns 1.
    same = Verdict((1, 0), 5)
    assert pairwise_reward(same, same, 2, 8) == 0.0
    assert pairwise_reward(Verdict((1, 0), 2), Verdict((1, 0), 7), 2, 8) == 1.0
    assert pairwise_reward(Verdict((1, 0), 7), Verdict((1, 0), 2), 2, 8) == 0.0
    assert pairwise_reward(FormatFailure("x"), same, 2, 8) == -1.0
    with pytest.raises(ValueError, match="two different scores"):
        pairwise_reward(same, same, 3, 3)


def test_judge_reward_needs_the_annotation_fields():
    sample = RewardInput("j:...", "10,5", "judge/x", "judge", {"rubric": "12", "verdicts": [1, 0]})
    with pytest.raises(RewardError, match=r"sample 'judge/x'.*has no 'score' field"):
        get_reward("judge_agreement").score([sample])


# -- voting ---------------------------------------------------------------------------------------


def test_vote_orders_shuffle_all_but_the_first_and_are_seeded():
    orders = vote_orders("135", 8, seed=1, sample_id="rubric/3")
    assert orders[0] == [0, 1, 2] and all(sorted(o) == [0, 1, 2] for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert orders == vote_orders("135", 8, seed=1, sample_id="rubric/3")
    assert orders != vote_orders("135", 8, seed=2, sample_id="rubric/3")


def test_aggregate_unpermutes_and_averages_the_parsed_votes():
    # Votes list the rubric in orders [0,1,2], [2,0,1], [1,2,0]; all say code-0 yes, code-1 no, code-2 yes.
    orders = [[0, 1, 2], [2, 0, 1], [1, 2, 0]]
    v = aggregate(["101,6", "110,8", "011,4"], orders, 3)
    assert v.verdicts == (1.0, 0.0, 1.0) and v.score == 6.0 and v.parsed == 3
    v = aggregate(["101,6", "garbage", "001,3"], orders, 3)  # the third lists 1,2,0: code-0 yes, 1 no, 2 no
    assert v.verdicts == (1.0, 0.0, 0.5) and v.score == 4.5 and v.parsed == 2 and v.k == 3
    assert aggregate(["x", "1,"], orders[:2], 3).score is None


class TruthfulJudge:
    """A judge that reads the (possibly shuffled) judge prompt and answers with the hand rule
    "verdict 1 for every code that is odd; score = first letter's position": it depends on the
    listed order, so un-permuting is checked."""

    def __init__(self):
        self.calls = []

    def judge(self, prompts, seeds):
        self.calls.append((list(prompts), list(seeds)))
        out = []
        for p in prompts:
            rubric = p.split("|")[1].split(":")[0]
            response = p.split(":")[2][:-1]
            out.append("".join(str(int(c) % 2) for c in rubric) + f",{min(9, len(response))}")
        return out


def test_grm_reward_votes_k_shuffled_verdicts():
    judge = TruthfulJudge()
    tasks = RubricTasks(seed=0, eval_size=5)
    prompts = tasks.prompts(0, 4)
    responses = ["ab", "abcdef", "a", "abc"]
    reward = GRMReward(judge, k=4, seed=9)
    results = reward.score(reward_inputs(prompts, responses))
    (sent, seeds), = judge.calls
    assert len(sent) == 16 and len(set(seeds)) == 16
    for p, r, res in zip(prompts, responses, results):
        assert res.score == pytest.approx(len(r) / 9)
        assert res.info["verdicts"] == tuple(float(int(c) % 2) for c in p.metadata["rubric"])
    shuffled = [s for s in sent if s.split("|")[1].split(":")[0] not in {p.metadata["rubric"] for p in prompts}]
    assert shuffled, "votes after the first list the rubric in another order"
    assert GRMReward(judge, k=4, seed=9).score(reward_inputs(prompts, responses)) == results  # seeded
    class Broken:
        def judge(self, prompts, seeds):
            return ["nope"] * len(prompts)
    failed = GRMReward(Broken(), k=2, format_reward=-0.5).score(reward_inputs(prompts, responses))
    assert [r.score for r in failed] == [-0.5] * 4 and all(r.info["format_failure"] for r in failed)
    with pytest.raises(ValueError, match="grm.votes=0"):
        GRMReward(judge, k=0)


# -- the evaluator's metrics ----------------------------------------------------------------------


def test_evaluator_metrics_hand_computed(tmp_path):
    from megatron_opd.stages.grm_eval import best_of_n, pairwise_accuracy, rank_correlation, reward_gap, spearman

    truth = [[0.1, 0.5, 0.9], [0.2, 0.2, 0.8]]
    # group 1: pairs (0,1) right, (0,2) tie, (1,2) reversed; group 2: (0,1) equal truths (skipped),
    # (0,2) right, (1,2) right.
    judge = [[1, 3, 1], [0, 5, 9]]
    acc, pairs = pairwise_accuracy(judge, truth)
    assert pairs == 5 and acc == pytest.approx((1 + 0.5 + 0 + 1 + 1) / 5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)
    assert rank_correlation([[5, 5, 5], [0, 5, 9]], truth) == pytest.approx((0.0 + spearman([0, 5, 9], truth[1])) / 2)
    b = best_of_n(judge, truth, 3, seed=0)
    assert b["judge"] == pytest.approx((0.5 + 0.8) / 2) and b["oracle"] == pytest.approx((0.9 + 0.8) / 2)
    assert best_of_n(judge, truth, 1, seed=0) == {"judge": pytest.approx(0.15), "oracle": pytest.approx(0.15),
                                                  "random": pytest.approx(0.15)}  # fmt: skip
    with pytest.raises(ValueError, match="best-of-4 needs 4"):
        best_of_n(judge, truth, 4, seed=0)
    path = tmp_path / "grm_samples.jsonl"
    rows = [  # "bdfh" under 135 scores 1.0; "hfdb" 5/7; the second record of (0, a) replaces the first
        {"rollout": 0, "sample_id": "a", "query": "bdfh", "rubric": "135", "response": "zz", "reward": 0.0},
        {"rollout": 0, "sample_id": "a", "query": "bdfh", "rubric": "135", "response": "bdfh", "reward": 0.5},
        {"rollout": 1, "sample_id": "b", "query": "bdfh", "rubric": "135", "response": "hfdb", "reward": 1.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gap = reward_gap(path)
    assert [g["rollout"] for g in gap] == [0, 1]
    assert gap[0]["gap"] == pytest.approx(0.5 - 1.0) and gap[1]["gap"] == pytest.approx(1.0 - 5 / 7)


def test_grm_source_interleaves_the_task_and_judge_prompts_with_permuted_rubrics(tmp_path):
    from megatron_opd.data.rubric import GRMSource, load_annotations
    from megatron_opd.grm_oracle import oracle

    path = _annotation_file(tmp_path, 50, noise=0.0)
    s = load_annotations(path)
    src = GRMSource(["rubric", "judge"], seed=1, eval_size=8, annotations=s, template=JudgeTemplate(),
                    baseline=annotation_baselines(s.items).to_json())  # fmt: skip
    ps = src.prompts(0, 200)
    assert [p.domain for p in ps[:4]] == ["rubric", "judge", "rubric", "judge"]
    assert [p.text for p in ps] == [p.text for p in src.prompts(0, 200)]
    judged = [p for p in ps if p.domain == "judge"]
    orders = set()
    for p in judged:  # the labels follow the listed order: noise-free labels are the oracle's
        m = p.metadata
        assert tuple(m["verdicts"]) == oracle.verdicts(m["query"], m["rubric"], m["response"])
        assert p.text == f"j:{m['query']}|{m['rubric']}:{m['response']}>" and m["target"] == verdict_text(m["verdicts"], m["score"])
        orders.add(m["rubric"])
    # 100 judge prompts = two epochs over the 50 annotations, the rubrics in more than one order.
    assert len({(p.metadata["query"], p.metadata["response"]) for p in judged}) == 50
    assert len(orders) > 50
    assert all("target" in p.metadata for p in ps if p.domain == "rubric")
    assert src.reward_name("rubric") == "grm" and src.reward_name("judge") == "judge_agreement"
    with pytest.raises(ValueError, match="'judge' but data.annotations"):
        GRMSource(["judge"], seed=1, eval_size=8, annotations=None, template=JudgeTemplate())


def test_reward_gap_plot_is_written(tmp_path):
    from megatron_opd.stages.grm_eval import plot_reward_gaps

    gap = [{"rollout": 0, "judge": 0.2, "oracle": 0.3, "gap": -0.1}, {"rollout": 1, "judge": 0.5, "oracle": 0.2, "gap": 0.3}]
    plot_reward_gaps({1: {"grm": gap, "scalar_rm": gap}, 2: {"grm": gap[:1]}}, tmp_path / "gap.png")
    assert (tmp_path / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
