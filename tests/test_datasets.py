"""Prompt datasets from files (data/datasets.py) on JSONL and Parquet files written here: the same
rows give the same samples in both formats, weights hold over many samples, a sample depends on
its global index alone (a resumed run sees what an uninterrupted one would), epochs cover every
row once, held-out rows are never trained on, and a bad row is refused with its file and line
(or dropped by data.bad_rows=drop and counted).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from hf_fixtures import chat_rows, make_bpe_tokenizer, math_rows, write_jsonl, write_parquet
from megatron_opd.config import ConfigError, DataConfig, DatasetConfig, JobConfig, build
from megatron_opd.data.datasets import DatasetError, FileDatasets, WeightedMix, floor_sum
from megatron_opd.data.prompts import DemonstrationSource, PromptSource
from megatron_opd.data.sources import job_prompt_source, prompt_source


def data_config(*datasets: DatasetConfig, **kw) -> DataConfig:
    cfg = DataConfig(datasets=list(datasets), **kw)
    cfg.check()
    return cfg


def test_floor_sum_and_the_mix_counts_match_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n, m, a, b = rng.randint(1, 60), rng.randint(1, 50), rng.randint(0, 120), rng.randint(0, 120)
        assert floor_sum(n, m, a, b) == sum((a * i + b) // m for i in range(n))
    mix = WeightedMix([1.0, 2.5, 0.5], seed=3)
    picks = [mix.dataset_at(i) for i in range(3000)]
    for index in (0, 1, 17, 999, 3000):
        for k in range(3):
            assert mix.draws_before(index, k) == picks[:index].count(k)


def test_jsonl_and_parquet_give_the_same_samples(tmp_path):
    rows = math_rows(40)
    for r in rows[::4]:
        r["domain"] = "arith"  # a row may name another domain of data.datasets
    chats = chat_rows(30)
    jsonl = data_config(
        DatasetConfig(path=str(write_jsonl(tmp_path / "math.jsonl", rows)), domain="math", verifier="math", weight=2),
        DatasetConfig(path=str(write_jsonl(tmp_path / "chat.jsonl", chats)), domain="chat", verifier="exact"),
        DatasetConfig(path=str(write_jsonl(tmp_path / "arith.jsonl", math_rows(5, seed=9))), domain="arith", verifier="exact"),
        seed=5,
    )
    parquet = data_config(
        DatasetConfig(path=str(write_parquet(tmp_path / "math.parquet", rows)), domain="math", verifier="math", weight=2),
        DatasetConfig(path=str(write_parquet(tmp_path / "chat.parquet", chats)), domain="chat", verifier="exact"),
        DatasetConfig(path=str(write_parquet(tmp_path / "arith.parquet", math_rows(5, seed=9))), domain="arith", verifier="exact"),
        seed=5,
    )
    a, b = prompt_source(jsonl), prompt_source(parquet)
    assert isinstance(a, PromptSource) and a.domains == ["math", "chat", "arith"]
    got_a, got_b = a.prompts(0, 300), b.prompts(0, 300)
    assert got_a == got_b
    assert [p.origin.split(":")[0].endswith(".jsonl") for p in got_a] == [True] * 300
    assert got_b[0].origin.split(":")[-1].startswith("row ")
    by_domain = Counter(p.domain for p in got_a)
    assert set(by_domain) == {"math", "chat", "arith"}
    p = next(p for p in got_a if p.domain == "math")
    assert p.metadata["answer"] == str(eval(p.text.split("What is ")[1].split("?")[0].replace("plus", "+")))
    assert p.messages == ({"role": "user", "content": p.text},) and p.sample_id.startswith("math/")
    c = next(p for p in got_a if p.domain == "chat")
    # a conversation's prompt is its turns up to the last user turn; the text is that turn's
    assert c.messages[-1]["role"] == "user" and c.text == c.messages[-1]["content"]
    assert a.reward_name("math") == "math" and a.reward_name("chat") == "exact"


def test_weights_hold_over_many_samples_and_every_epoch_covers_each_row_once(tmp_path):
    files = [write_jsonl(tmp_path / f"d{k}.jsonl", math_rows(n, seed=k)) for k, n in enumerate((7, 50, 13))]
    weights = (1.0, 3.0, 0.5)
    cfg = data_config(
        *(DatasetConfig(path=str(f), domain=f"d{k}", verifier="exact", weight=w) for k, (f, w) in enumerate(zip(files, weights))),
        seed=1,
    )
    src = FileDatasets(cfg)
    N = 9000
    prompts = src.prompts(0, N)
    counts = Counter(p.domain for p in prompts)
    for k, w in enumerate(weights):
        want = N * w / sum(weights)
        assert abs(counts[f"d{k}"] - want) <= 12, (k, counts, want)  # low discrepancy: O(log N), not sqrt(N)
        # any window of 500 indices holds each share too
        window = Counter(p.domain for p in prompts[4321 : 4321 + 500])
        assert abs(window[f"d{k}"] - 500 * w / sum(weights)) <= 8
    # epochs: dataset k's draws 0..n-1 are a permutation of its rows, the next n another one
    for k, n in enumerate((7, 50, 13)):
        texts = [p.text for p in prompts if p.domain == f"d{k}"]
        rows = sorted(r["prompt"] for r in math_rows(n, seed=k))
        assert sorted(texts[:n]) == rows and sorted(texts[n : 2 * n]) == rows
        assert texts[:n] != texts[n : 2 * n]  # each epoch shuffled anew


def test_a_sample_depends_on_its_global_index_alone(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", math_rows(30))
    g = write_jsonl(tmp_path / "c.jsonl", chat_rows(20))
    cfg = data_config(
        DatasetConfig(path=str(f), domain="math", verifier="math", weight=1),
        DatasetConfig(path=str(g), domain="chat", weight=2),
        seed=7,
    )
    straight = FileDatasets(cfg).prompts(0, 400)
    # a "resumed" source, built anew, starting at step 37 of 8 samples, then read out of order
    resumed = FileDatasets(cfg)
    assert resumed.prompts(37 * 8, 400 - 37 * 8) == straight[37 * 8 :]
    assert [FileDatasets(cfg).prompt(i) for i in (399, 5, 200)] == [straight[399], straight[5], straight[200]]
    assert [p.sample_id for p in straight] == [f"{p.domain}/{i}" for i, p in enumerate(straight)]
    # another seed is another order
    other = FileDatasets(DataConfig(datasets=cfg.datasets, seed=8)).prompts(0, 400)
    assert other != straight


def test_held_out_rows_are_never_trained_on(tmp_path):
    rows = math_rows(100)
    rows.append(dict(rows[3]))  # a duplicate of a (maybe held-out) prompt
    f = write_jsonl(tmp_path / "m.jsonl", rows)
    cfg = data_config(DatasetConfig(path=str(f), domain="math", verifier="math", eval_fraction=0.2), eval_size=15)
    src = FileDatasets(cfg)
    held = {p.text for p in src.eval_prompts("math")}
    assert len(held) == 15 and all(p.sample_id.startswith("math/eval") for p in src.eval_prompts("math"))
    all_held = {r.text for r in src.held_out_rows["math"]}
    assert len(all_held) == 20
    trained = {p.text for p in src.prompts(0, 2000)}
    assert not trained & all_held and trained == {r["prompt"] for r in rows} - all_held
    # an eval file instead
    e = write_jsonl(tmp_path / "eval.jsonl", rows[:10])
    cfg = data_config(DatasetConfig(path=str(f), domain="math", verifier="math", eval_path=str(e)))
    src = FileDatasets(cfg)
    assert [p.text for p in src.eval_prompts("math")] == [r["prompt"] for r in rows[:10]]
    assert not {p.text for p in src.prompts(0, 1000)} & {r["prompt"] for r in rows[:10]}
    assert src.excluded_as_held_out == 11  # the training file's copies of the eval file's prompts (row 3 twice)


BAD_ROWS = [
    ('{"prompt": "What is 1 plus 1?"', "the line is not valid JSON", "undecodable"),
    ('["a list"]', "the row is a JSON list, not an object", "undecodable"),
    ('{"answer": "2"}', "the row has neither 'messages' nor 'prompt'", "missing_field"),
    ('{"prompt": "What is 1 plus 1?"}', "no 'answer' field, which the math verifier of domain 'math' reads", "missing_field"),
    ('{"prompt": "x", "answer": "1", "domain": "poetry"}', "field 'domain' is 'poetry', not one of data.datasets' domains ['math']", "bad_field"),
    ('{"messages": [{"role": "robot", "content": "hi"}], "answer": "1"}', "field 'messages': turn 0 has role 'robot'", "bad_field"),
    ('{"messages": [{"role": "user", "content": 5}], "answer": "1"}', "field 'messages': turn 0 (user) has content of type int", "bad_field"),
]


@pytest.mark.parametrize("line,message,reason", BAD_ROWS)
def test_a_bad_row_is_refused_with_file_and_line(tmp_path, line, message, reason):
    good = [f'{{"prompt": "What is {i} plus 1?", "answer": "{i + 1}"}}' for i in range(4)]
    f = write_jsonl(tmp_path / "m.jsonl", good[:2] + [line] + good[2:])
    cfg = data_config(DatasetConfig(path=str(f), domain="math", verifier="math"))
    with pytest.raises(DatasetError) as e:
        FileDatasets(cfg)
    assert str(e.value).startswith(f"{f}:3: {message}") and "data.bad_rows=drop" in str(e.value)
    cfg.bad_rows = "drop"
    src = FileDatasets(cfg)
    assert src.metrics == {"data/dropped_rows": 1.0, f"data/dropped_rows/{reason}": 1.0}
    assert sorted({p.text for p in src.prompts(0, 40)}) == sorted(f"What is {i} plus 1?" for i in range(4))


def test_undecodable_bytes_and_parquet_rows_are_named(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_bytes(b'{"prompt": "a", "answer": "1"}\n\n{"prompt": "caf\xe9", "answer": "1"}\n')
    cfg = data_config(DatasetConfig(path=str(f), domain="math", verifier="exact"))
    with pytest.raises(DatasetError, match=rf"^{f}:3: the line is not UTF-8"):
        FileDatasets(cfg)
    p = write_parquet(tmp_path / "m.parquet", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}])
    cfg = data_config(DatasetConfig(path=str(p), domain="math", verifier="exact"))
    with pytest.raises(DatasetError, match=rf"^{p}:row 2: no 'answer' field"):
        FileDatasets(cfg)


def test_over_long_rows_are_measured_with_the_jobs_tokenizer(tmp_path):
    from megatron_opd.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(make_bpe_tokenizer(tmp_path / "tok"))
    long = "What is " + " plus ".join(str(i) for i in range(60)) + "?"
    f = write_jsonl(tmp_path / "m.jsonl", math_rows(3) + [{"prompt": long, "answer": "1"}])
    job = build(JobConfig, {
        "model": {"vocab_size": tok.vocab_size, "max_seq_len": 96},
        "rollout": {"max_new_tokens": 32},
        "data": {"datasets": [{"path": str(f), "domain": "math", "verifier": "math"}]},
    })  # fmt: skip
    n = len(tok.encode_prompt([{"role": "user", "content": long}]))
    assert n > 64
    with pytest.raises(DatasetError, match=rf"^{f}:4: the prompt is {n} tokens, over the 64 it may have \(model.max_seq_len=96 - rollout.max_new_tokens=32\)"):
        job_prompt_source(job, tok)
    job.data.bad_rows = "drop"
    assert job_prompt_source(job, tok).metrics["data/dropped_rows/over_long"] == 1.0


def test_sft_sources_need_the_assistants_reply(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", chat_rows(3) + [{"messages": [{"role": "user", "content": "hi"}]}])
    cfg = data_config(DatasetConfig(path=str(f), domain="chat"))
    assert len(FileDatasets(cfg).prompts(0, 10)) == 10  # as prompts the row is fine
    with pytest.raises(DatasetError, match=rf"^{f}:4: SFT needs the assistant's reply"):
        FileDatasets(cfg, demonstrations=True)
    src = prompt_source(DataConfig(datasets=cfg.datasets, bad_rows="drop"), demonstrations=True)
    assert isinstance(src, DemonstrationSource)
    demos = src.demonstrations(0, 6)
    assert all(d.messages[-1]["role"] == "assistant" for d in demos)
    assert [d.prompt.sample_id for d in demos] == [p.sample_id for p in src.prompts(0, 6)]
    # a prompt + completion row is a one-exchange conversation
    g = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is 1 plus 1?", "completion": "2"}])
    (d,) = FileDatasets(data_config(DatasetConfig(path=str(g), domain="chat")), demonstrations=True).demonstrations(0, 1)
    assert d.messages == ({"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"})


def test_data_config_checks_the_datasets(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", math_rows(3))
    cases = [
        (dict(path=str(tmp_path / "nope.jsonl"), domain="m"), r"data.datasets\[0\].path=.*nope.jsonl does not exist"),
        (dict(path=str(f).replace(".jsonl", ".csv"), domain="m"), r"a dataset file ends in .jsonl or .parquet"),
        (dict(path=str(f)), r"data.datasets\[0\].domain is empty"),
        (dict(path=str(f), domain="m", weight=0), r"data.datasets\[0\].weight must be > 0"),
        (dict(path=str(f), domain="m", eval_fraction=1.0), r"eval_fraction must be in \[0, 1\)"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            build(DataConfig, {"datasets": [spec]}).check()
    with pytest.raises(ConfigError, match=r"data.datasets\[1\].verifier='exact' but data.datasets\[0\] gives domain 'm' the verifier 'math'"):
        build(DataConfig, {"datasets": [dict(path=str(f), domain="m", verifier="math"), dict(path=str(f), domain="m", verifier="exact")]}).check()
    with pytest.raises(ConfigError, match=r"data.domains=\['add'\] names tiny domains, but data.datasets is set"):
        build(DataConfig, {"domains": ["add"], "datasets": [dict(path=str(f), domain="m")]}).check()
    with pytest.raises(ConfigError, match=r"unknown config key 'data.datasets\[0\].wieght'; did you mean 'data.datasets\[0\].weight'"):
        build(DataConfig, {"datasets": [dict(path=str(f), domain="m", wieght=2)]}, "data")
    # the tiny default is untouched
    assert DataConfig().source_domains == ["add", "reverse", "sort"] and not DataConfig().datasets


def test_an_opd_job_on_files_needs_a_teacher_and_a_verifier_per_domain(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", math_rows(3))
    job = build(JobConfig, {
        "stage": "opd",
        "data": {"datasets": [{"path": str(f), "domain": "math", "verifier": "math"}, {"path": str(f), "domain": "chat"}]},
        "teachers": {"t": {"endpoints": ["http://127.0.0.1:1"], "domains": ["math"], "signal": "sampled"}},
    })  # fmt: skip
    with pytest.raises(ConfigError) as e:
        job.check(1)
    text = str(e.value)
    assert "domain 'chat' (data.datasets) has no teacher" in text
    assert f"data.datasets[1] ({f}) has no verifier, which the opd stage scores its domain 'chat' with" in text
