"""The tiny verifiable domains (data/domains.py) and their rule verifiers (rewards/tiny.py).

Every domain: prompts are deterministic by index, the verifier accepts the right answer (checked
against hand-written examples, not only against the rule) and rejects near misses, held-out
prompts never reach training, and every sequence fits the character tokenizer and the tiny
models' length. The conflicting twins share bodies and disagree on the answer.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from megatron_opd.data.domains import (
    DOMAINS,
    MAX_SEQUENCE_TOKENS,
    TWINS,
    TinyDomains,
    get_domain,
    twin_prompt,
)
from megatron_opd.data.tokenizer import TINY_ALPHABET, CharTokenizer
from megatron_opd.rewards.registry import get_reward
from megatron_opd.rewards.tiny import TinyDomainReward
from megatron_opd.rewards.types import RewardError, RewardInput
from megatron_opd.config import DataConfig
from megatron_opd.config.job import GRM_DOMAINS
from megatron_opd.rollout.config import RolloutConfig

REPO = Path(__file__).resolve().parents[1]
TWIN_OF = {a: b for pair in TWINS for a, b in (pair, pair[::-1])}

# Worked by hand (not by the rule): prompt -> answer, a few per domain.
EXAMPLES = {
    "add": [("37+45=", "82"), ("99+99=", "198"), ("10+10=", "20")],
    "sub": [("82-45=", "37"), ("50-50=", "0"), ("91-19=", "72")],
    "reverse": [("r:hjqa=", "aqjh"), ("r:abc=", "cba"), ("r:zzyzz=", "zzyzz")],
    "sort": [("s:5193=", "1359"), ("s:000=", "000"), ("s:98765=", "56789")],
    "dsort": [("d:5193=", "9531"), ("d:102=", "210"), ("d:12345=", "54321")],
    "count": [("n:abca=", "4"), ("n:hh=", "2"), ("n:abcdefgha=", "9")],
    "rot1": [("c:hjqa=", "ikrb"), ("c:xyz=", "yza"), ("c:abcde=", "bcdef")],
    "rot3": [("k:hjqa=", "kmtd"), ("k:xyz=", "abc"), ("k:hello=", "khoor")],
    "max": [("m:51937=", "9"), ("m:000=", "0"), ("m:123456780=", "8")],
    "min": [("i:51937=", "1"), ("i:999=", "9"), ("i:987654321=", "1")],
}


def _score(domain: str, prompt: str, response: str) -> float:
    sample = RewardInput(prompt=prompt, response=response, sample_id="s", domain=domain)
    return get_reward(domain).score([sample])[0].score


def _near_misses(answer: str, rng: random.Random) -> list[str]:
    """Each character of `answer` changed to another one, a character more, one less, empty."""
    changed = []
    for i, c in enumerate(answer):
        other = rng.choice([a for a in "0123456789abcdefghijklmnopqrstuvwxyz" if a != c])
        changed.append(answer[:i] + other + answer[i + 1 :])
    return changed + [answer + answer[-1], answer[:-1], ""]


def test_at_least_ten_domains_with_conflicting_twins():
    assert len(DOMAINS) >= 10
    assert {"add", "reverse", "sort", "count"} <= set(DOMAINS)  # the first four are kept
    assert len(TWINS) >= 2 and len(TWIN_OF) == 2 * len(TWINS)  # each domain in at most one pair
    assert set(EXAMPLES) == set(DOMAINS)
    for a, b in TWINS:
        da, db = get_domain(a), get_domain(b)
        assert da.tag and db.tag and da.tag != db.tag and len(da.tag) == len(db.tag)
        # The same bodies, drawn the same way: the tag is all that tells the twins apart.
        for seed in range(50):
            pa = da.sample_prompt(random.Random(seed))
            assert db.sample_prompt(random.Random(seed)) == twin_prompt(pa, a, b)
        # ... and the answers differ (all but the rare bodies the two rules agree on).
        prompts = [da.sample_prompt(random.Random(s)) for s in range(1000)]
        differ = [da.solve(p) != db.solve(twin_prompt(p, a, b)) for p in prompts]
        assert sum(differ) >= 950, (a, b, sum(differ))
    with pytest.raises(ValueError, match="both must be tagged"):
        twin_prompt("37+45=", "add", "sub")


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_rule_matches_hand_worked_examples(name):
    domain = get_domain(name)
    for prompt, answer in EXAMPLES[name]:
        assert domain.solve(prompt) == answer, prompt
        assert _score(name, prompt, answer) == 1.0


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_prompts_are_deterministic_by_index(name):
    source = TinyDomains([name], seed=7, eval_size=200)
    again = TinyDomains([name], seed=7, eval_size=200)
    prompts = source.prompts(0, 300)
    assert prompts == again.prompts(0, 300)
    assert [source.prompt(i) for i in (299, 17, 150)] == [prompts[299], prompts[17], prompts[150]]
    assert source.prompts(100, 50) == prompts[100:150]  # resumable: index, not history
    assert source.eval_prompts(name) == again.eval_prompts(name)
    other_seed = TinyDomains([name], seed=8, eval_size=200).prompts(0, 300)
    assert sum(p.text != q.text for p, q in zip(prompts, other_seed)) > 200
    tag = get_domain(name).tag
    assert all(p.text.startswith(tag) and p.text.endswith("=") and p.domain == name for p in prompts)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_verifier_accepts_the_answer_and_rejects_near_misses(name):
    rng = random.Random(0)
    domain = get_domain(name)
    reward = get_reward(name)
    assert isinstance(reward, TinyDomainReward) and reward.name == name  # no other reward shadows it
    prompts = [p.text for p in TinyDomains([name], seed=1, eval_size=0).prompts(0, 200)]
    samples, want = [], []
    for i, prompt in enumerate(prompts):
        answer = domain.solve(prompt)
        wrong = _near_misses(answer, rng)
        if name in TWIN_OF:
            twin = TWIN_OF[name]
            twin_answer = get_domain(twin).solve(twin_prompt(prompt, name, twin))
            if twin_answer != answer:
                wrong.append(twin_answer)
        for response, correct in [(answer, True)] + [(w, False) for w in wrong if w != answer]:
            samples.append(RewardInput(prompt=prompt, response=response, sample_id=f"{i}", domain=name))
            want.append(1.0 if correct else 0.0)
    results = reward.score(samples)
    assert [r.score for r in results] == want
    assert all(r.info["expected"] == domain.solve(s.prompt) for r, s in zip(results, samples))


@pytest.mark.parametrize("a,b", TWINS)
def test_a_verifier_refuses_its_twins_prompts(a, b):
    prompt = twin_prompt(get_domain(a).sample_prompt(random.Random(0)), a, b)
    with pytest.raises(RewardError, match=f"is not a {a} prompt"):
        _score(a, prompt, get_domain(a).solve(prompt))


def test_held_out_prompts_never_appear_in_training():
    names = sorted(DOMAINS)
    source = TinyDomains(names, seed=1234, eval_size=200)
    training = source.prompts(0, 200 * len(names) * 10)  # 2000 per domain
    for name in names:
        held_out = [p.text for p in source.eval_prompts(name)]
        assert len(held_out) == len(set(held_out)) == 200, name
        seen = {p.text for p in training if p.domain == name}
        assert len(seen) > 1000, name  # far more distinct prompts than the held-out set
        assert not seen & set(held_out), name
    # A twin's held-out set is its own: the same body may train under the other tag.
    assert {p.domain for p in training} == set(names)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_sequences_fit_the_tokenizer_and_the_tiny_models(name):
    tokenizer = CharTokenizer()
    assert tokenizer.vocab_size == 51 and tokenizer.alphabet == TINY_ALPHABET  # every model depends on it
    source = TinyDomains([name], seed=3, eval_size=200)
    prompts = source.prompts(0, 2000) + source.eval_prompts(name)
    longest = 0
    for p in prompts:
        answer = get_domain(name).solve(p.text)
        assert 1 <= len(answer) <= 5, (p.text, answer)
        row = tokenizer.encode_prompt(p.text) + tokenizer.encode(answer) + [tokenizer.eos_id]
        assert tokenizer.decode(row) == p.text + answer
        longest = max(longest, len(row))
    assert longest <= MAX_SEQUENCE_TOKENS
    from megatron_opd.stages.sft import encode_demonstrations

    # SFT's rendering of the domain's demonstrations (refuses a row over the limit).
    rows = encode_demonstrations(source.demonstrations(0, 256), tokenizer, MAX_SEQUENCE_TOKENS)
    assert max(len(ids) for ids, _ in rows) <= MAX_SEQUENCE_TOKENS


def test_tiny_configs_hold_every_domains_sequences():
    for path in sorted((REPO / "configs" / "tiny").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["model"]["max_seq_len"] >= MAX_SEQUENCE_TOKENS, path
        assert cfg["model"]["vocab_size"] == CharTokenizer().vocab_size, path
        # The response budget must hold the longest answer of the config's domains and EOS (5 + 1
        # over all domains; a config of `add` alone needs 3 + 1).
        budget = cfg.get("rollout", {}).get("max_new_tokens", RolloutConfig().max_new_tokens)
        domains = cfg.get("data", {}).get("domains", DataConfig().domains)
        if set(domains) <= set(GRM_DOMAINS):
            continue  # the GRM's rubric and judge prompts (data/rubric.py; tests/test_grm.py)
        longest = max(len(get_domain(d).solve(p.text)) for d in domains for p in TinyDomains([d], 0, 0).prompts(0, 2000))
        assert budget >= longest + 1, (path, budget, longest)
