"""The protocols the next stages build on, held by their first implementations (no process group):

- Tokenizer: the character tokenizer (prompt encoding, stop ids, save/load by what a directory
  holds) and the tokenizer a run picks (its own, its init_from model's, or the default);
- PromptSource and the data cursor: the tiny domains, replica slices, groups of samples;
- Reward: the registry (closest-name errors), the tiny verifiers, per-batch scoring and its errors;
- Scorer: the HTTP teacher pool is one.
"""

from __future__ import annotations

import json

import pytest

from megatron_opd.data.domains import TinyDomains
from megatron_opd.data.prompts import Prompt, PromptSource, replica_slice, repeat_for_group
from megatron_opd.data.tokenizer import TINY_ALPHABET, CharTokenizer, Tokenizer, load_tokenizer
from megatron_opd.rewards.base import Reward, is_correct, score_responses
from megatron_opd.rewards.registry import REWARDS, get_reward, rewards_for
from megatron_opd.rewards.types import RewardError, RewardResult

# -- Tokenizer ----------------------------------------------------------------------------------


def test_char_tokenizer_is_a_tokenizer_and_encodes_prompts():
    tok = CharTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.stop_ids == (tok.eos_id,)
    assert tok.encode_prompt("12+3=") == [tok.bos_id, *tok.encode("12+3=")]
    assert tok.encode_prompt([{"role": "user", "content": "12+3="}]) == tok.encode_prompt("12+3=")
    with pytest.raises(ValueError, match=r"no chat template.*\['system', 'user'\]"):
        tok.encode_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1="}])
    ids = tok.encode("42") + [tok.eos_id] + tok.encode("7")
    assert tok.decode(ids) == "42" and tok.decode(ids, stop_at_eos=False) == "427"


def test_load_tokenizer_dispatches_on_what_the_directory_holds(tmp_path):
    mine = CharTokenizer(alphabet=TINY_ALPHABET[::-1])
    mine.save(tmp_path / "char")
    loaded = load_tokenizer(tmp_path / "char")
    assert loaded == mine and loaded.fingerprint == mine.fingerprint != CharTokenizer().fingerprint
    # Hugging Face tokenizer files (the `tokenizers` library's tokenizer.json, or tokenizer_config.json
    # in hf/ as an import leaves it) go to the HF tokenizer (tests/test_hf_tokenizer.py); these stubs
    # are refused by name, not misread as the character tokenizer.
    (tmp_path / "hf_json").mkdir()
    (tmp_path / "hf_json/tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    with pytest.raises(ValueError, match="Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "hf_json")
    (tmp_path / "imported/hf").mkdir(parents=True)
    (tmp_path / "imported/hf/tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "imported")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd/tokenizer.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(tmp_path / "odd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_run_tokenizer_is_the_runs_own_else_the_init_models_else_the_default(tmp_path):
    from megatron_opd.data.tokenizer import run_tokenizer

    reversed_tok = CharTokenizer(alphabet=TINY_ALPHABET[::-1])
    reversed_tok.save(tmp_path / "init")
    (tmp_path / "init/checkpoints/step_00000003").mkdir(parents=True)
    run = tmp_path / "run"
    assert run_tokenizer(run) == CharTokenizer()
    assert run_tokenizer(run, tmp_path / "init") == reversed_tok
    assert run_tokenizer(run, tmp_path / "init/checkpoints") == reversed_tok
    assert run_tokenizer(run, tmp_path / "init/checkpoints/step_00000003") == reversed_tok
    CharTokenizer().save(run)  # a resumed run keeps the tokenizer it started with
    assert run_tokenizer(run, tmp_path / "init") == CharTokenizer()


# -- PromptSource and the data cursor --------------------------------------------------------------


def test_tiny_domains_are_a_prompt_source():
    source = TinyDomains(["add", "reverse"], seed=3, eval_size=10)
    assert isinstance(source, PromptSource)
    assert source.domains == ["add", "reverse"]
    assert [p.domain for p in source.prompts(0, 4)] == ["add", "reverse", "add", "reverse"]
    assert source.prompts(5, 2) == [source.prompt(5), source.prompt(6)]  # deterministic by index
    held_out = {p.text for d in source.domains for p in source.eval_prompts(d)}
    assert not held_out & {p.text for p in source.prompts(0, 400)}
    assert source.reward_name("add") == "add"


def test_replica_slices_cover_each_batch_once_in_order():
    slices = [replica_slice(batch, 12, d, 3) for batch in range(3) for d in range(3)]
    assert [i for s in slices for i in s] == list(range(36))
    assert replica_slice(2, 12, 1, 3) == range(28, 32)
    with pytest.raises(ValueError, match="does not split over 5"):
        replica_slice(0, 12, 0, 5)


def test_groups_repeat_each_prompt_with_its_own_sample_ids():
    prompts = [Prompt("1+2=", "add", "add/0"), Prompt("r:ab=", "reverse", "reverse/1")]
    assert repeat_for_group(prompts, 1) == prompts
    group = repeat_for_group(prompts, 3)
    assert [p.sample_id for p in group] == ["add/0/0", "add/0/1", "add/0/2", "reverse/1/0", "reverse/1/1", "reverse/1/2"]
    assert [p.text for p in group] == ["1+2="] * 3 + ["r:ab="] * 3
    with pytest.raises(ValueError, match="at least one sample"):
        repeat_for_group(prompts, 0)


# -- Reward -----------------------------------------------------------------------------------------


def test_reward_registry_refuses_unknown_names_with_the_closest():
    with pytest.raises(ValueError, match="unknown reward 'revers'; did you mean 'reverse'"):
        get_reward("revers")
    with pytest.raises(ValueError, match="unknown reward 'regx'; did you mean 'regex'"):
        get_reward("regx")
    assert {"math", "code", "exact", "regex"} <= set(REWARDS)  # the real-domain verifiers, by name
    assert all(isinstance(get_reward(name), Reward) and get_reward(name).name == name for name in REWARDS)
    source = TinyDomains(["add", "sort"], seed=0, eval_size=4)
    rewards = rewards_for(source)
    assert sorted(rewards) == ["add", "sort"] and all(isinstance(r, Reward) for r in rewards.values())


def test_tiny_verifiers_score_per_batch_in_row_order():
    prompts = [Prompt("37+45=", "add", "a"), Prompt("s:5193=", "sort", "b"), Prompt("12+30=", "add", "c")]
    results = score_responses(prompts, ["82", "1359", "41"], {"add": get_reward("add"), "sort": get_reward("sort")})
    assert [(r.score, is_correct(r)) for r in results] == [(1.0, True), (1.0, True), (0.0, False)]
    assert results[2].info == {"expected": "42"}

    calls = []

    class Counting:
        name = "counting"

        def score(self, samples):
            calls.append([(s.sample_id, s.fields) for s in samples])
            return [RewardResult(score=float(len(s.response))) for s in samples]

    prompts[1] = Prompt("s:5193=", "sort", "b", metadata={"answer": "1359"})
    results = score_responses(prompts, ["x", "yy", "zzz"], {"add": Counting(), "sort": Counting()})
    # One call per reward over all of its rows, with the prompt's verifier fields.
    assert sorted(calls) == [[("a", {}), ("c", {})], [("b", {"answer": "1359"})]]
    assert [r.score for r in results] == [1.0, 2.0, 3.0]


def test_reward_failures_name_the_reward_domain_and_sample():
    prompts = [Prompt("1+1=", "add", "add/0"), Prompt("2+2=", "add", "add/1"), Prompt("r:ab=", "reverse", "reverse/2")]

    class Picky:
        name = "picky"

        def score(self, samples):
            if any(s.response == "boom" for s in samples):
                raise OSError("sandbox died")
            return [RewardResult(score=float("nan") if s.response == "nan" else 1.0) for s in samples]

    with pytest.raises(RewardError, match=r"picky verifier raised on sample 'add/1' \(domain 'add'\): OSError: sandbox died"):
        score_responses(prompts, ["2", "boom", "ba"], {"add": Picky(), "reverse": Picky()})
    with pytest.raises(RewardError, match=r"scored sample 'reverse/2' \(domain 'reverse'\) nan"):
        score_responses(prompts, ["2", "4", "nan"], {"add": Picky(), "reverse": Picky()})
    with pytest.raises(RewardError, match="domain 'reverse', which has no reward"):
        score_responses(prompts, ["2", "4", "ba"], {"add": Picky()})


# -- Scorer -----------------------------------------------------------------------------------------


def test_teacher_pool_is_a_scorer():
    from megatron_opd.teachers.pool import TeacherPool
    from megatron_opd.teachers.scorer import Scorer

    assert issubclass(TeacherPool, Scorer)


# -- where the protocols sit in the dependency order ----------------------------------------------


def test_data_and_rewards_sit_below_rollout_teachers_and_stages():
    from tests.test_serving_imports import module_imports, reaches

    graph = module_imports()
    above_data = ("megatron_opd.rewards", "megatron_opd.rollout", "megatron_opd.teachers", "megatron_opd.serving",
                  "megatron_opd.losses", "megatron_opd.stages")  # fmt: skip
    for m in (m for m in graph if m.startswith("megatron_opd.data")):
        assert not reaches(graph, m, above_data), (m, reaches(graph, m, above_data))
    for m in (m for m in graph if m.startswith("megatron_opd.rewards")):
        assert not reaches(graph, m, above_data[1:]), m
    assert "megatron_opd.rewards.registry" in graph["megatron_opd.stages.on_policy"]


def test_prompts_and_tokenizers_import_without_torch():
    """What a login node checks before launch (the run's tokenizer; prompts) needs no torch."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; import megatron_opd.data.prompts, megatron_opd.data.tokenizer, megatron_opd.rewards.types; "
        "print(sorted(m for m in ('torch', 'megatron', 'numpy') if m in sys.modules))"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
