"""Teachers and rollout servers with Hugging Face tokenizers (a BPE trained here): our server
reports its tokenizer, a stock SGLang server is checked through the tokenizer directory its
config names, and a mismatch is refused before any step with what differs (the first differing
token id, the template). Real servers (subprocesses, real HTTP on 127.0.0.1), random weights.
"""

from __future__ import annotations

import pytest
import yaml

from hf_fixtures import copy_tokenizer, make_bpe_tokenizer, set_chat_template, swap_tokens
from megatron_opd.config import to_dict
from megatron_opd.data.hf_tokenizer import HFTokenizer
from megatron_opd.models.config import ModelConfig
from megatron_opd.runtime.spawn import spawn_world
from megatron_opd.serving.launch import start_teacher_server, stop_all, wait_ready
from megatron_opd.teachers.config import TeacherConfig
from megatron_opd.teachers.pool import TeacherIncompatible, TeacherPool


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_teachers")
    base = make_bpe_tokenizer(root / "student_tok")
    swapped = copy_tokenizer(base, root / "swapped_tok")
    now_100, now_101 = swap_tokens(swapped, 100, 101)
    template = copy_tokenizer(base, root / "template_tok")
    set_chat_template(template, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    tok = HFTokenizer(base)
    model = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_attention_heads=2, max_seq_len=64)
    (root / "model.yaml").write_text(yaml.safe_dump(to_dict(model)))
    common = dict(random_init=True, model_config=root / "model.yaml", wait=False)
    servers = {
        "ours": start_teacher_server(tokenizer=swapped, **common),  # reports its (other) tokenizer
        "stock": start_teacher_server(tokenizer=base, extra_args=["--plain-sglang"], **common),  # reports none
    }
    try:
        wait_ready(list(servers.values()))
        yield dict(root=root, base=base, swapped=swapped, template=template, tok=tok, urls={k: s.url for k, s in servers.items()},
                   swapped_tokens=(now_100, now_101))  # fmt: skip
    finally:
        stop_all(list(servers.values()))


def _start(world, **cfg):
    teacher = TeacherConfig(domains=["chat"], signal="sampled", **cfg)
    with TeacherPool({"t": teacher}, student_vocab_size=world["tok"].vocab_size, student_tokenizer=world["tok"]) as pool:
        pool.start_sync()


def test_a_teacher_serving_another_tokenizer_is_refused_naming_the_first_differing_id(world):
    url = world["urls"]["ours"]
    was_100 = world["swapped_tokens"][1]
    with pytest.raises(TeacherIncompatible) as e:
        _start(world, endpoints=[url])
    text = str(e.value)
    assert text.startswith(f"teacher 't' at {url} has tokenizer fingerprint '{HFTokenizer(world['swapped']).fingerprint}'")
    assert f": token id 100 is {was_100!r} in the student's vocabulary and {world['swapped_tokens'][0]!r} in the teacher's" in text
    assert text.endswith("; refusing to start")


def test_a_stock_sglang_teacher_is_checked_through_its_tokenizer_dir(world):
    url = world["urls"]["stock"]
    with pytest.raises(TeacherIncompatible, match=r"set teachers.t.tokenizer_dir to the directory of the tokenizer it serves"):
        _start(world, endpoints=[url])
    with pytest.raises(TeacherIncompatible) as e:
        _start(world, endpoints=[url], tokenizer_dir=str(world["template"]))
    text = str(e.value)
    assert f"(teachers.t.tokenizer_dir) but the student has '{world['tok'].fingerprint}': the chat templates differ (line 1, column 9:" in text
    assert "token id" not in text
    _start(world, endpoints=[url], tokenizer_dir=str(world["base"]))  # the same tokenizer: probed, scored, accepted


def _rollout_worker(url: str, tok_dir: str):
    from megatron_opd.rollout.config import RolloutConfig
    from megatron_opd.rollout.sglang import RolloutServerError, SGLangRolloutEngine
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    init_runtime(ParallelLayout(), 0)
    try:
        SGLangRolloutEngine(RolloutConfig(engine="sglang", endpoints=[url]), None, HFTokenizer(tok_dir), max_len=64, seed=0)
    except RolloutServerError as e:
        return str(e)
    return "accepted"


def test_a_rollout_server_with_another_tokenizer_is_refused_before_any_step(world):
    url = world["urls"]["ours"]
    (text,) = spawn_world(_rollout_worker, 1, (url, str(world["base"])))
    assert text.startswith(f"rollout server {url} serves tokenizer fingerprint ")
    assert ": token id 100 is " in text and "in the server's" in text and text.endswith("start it with the student's tokenizer")
    (text,) = spawn_world(_rollout_worker, 1, (url, str(world["swapped"])))
    assert text == "accepted"
