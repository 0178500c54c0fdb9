"""Hugging Face tokenizers (data/hf_tokenizer.py) on a byte-level BPE trained here with `tokenizers`
(tests/hf_fixtures.py): the Tokenizer protocol, chat templating against transformers'
`apply_chat_template` itself, the assistant mask SFT trains on, fingerprints (equal for the same
files, different for one merge, one added token or the template) and the messages naming what
differs, and how a run and a teacher pool pick and compare tokenizers.
"""

from __future__ import annotations

import json

import pytest

from hf_fixtures import (
    QWEN2_CHAT_TEMPLATE,
    add_special_token,
    chat_rows,
    copy_tokenizer,
    make_bpe_tokenizer,
    set_chat_template,
    swap_merges,
)
from megatron_opd.data.hf_tokenizer import HFTokenizer
from megatron_opd.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, run_tokenizer, tokenizer_difference

# The same ChatML with transformers' {% generation %} tags around what the assistant produces.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "The answer is 5."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort 3 1 2 in order, please!"},
        {"role": "assistant", "content": "1 2 3"},
        {"role": "user", "content": "And reverse it?"},
        {"role": "assistant", "content": "3 2 1"},
    ],
    [{"role": "user", "content": "héllo wörld — ünïcode, emoji 🙂 and\ttabs\n\nnewlines"},
     {"role": "assistant", "content": "  leading spaces and <|im_start|> inside text"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
]  # fmt: skip


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


@pytest.fixture(scope="module")
def reference(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def test_hf_tokenizer_is_a_tokenizer_with_the_files_special_tokens(tok_dir, reference):
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == len(reference) == 360
    im_end, eot = reference.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tok.eos_id == im_end and tok.pad_id == eot and tok.bos_id is None
    assert tok.stop_ids == (im_end, eot)  # EOS, then generation_config.json's other eos ids
    text = "What is 12 plus 30? The answer is 42."
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    # decode stops at any stop id, and drops special tokens
    assert tok.decode(tok.encode("yes") + [eot] + tok.encode("no")) == "yes"
    assert tok.decode(tok.encode("yes") + [eot] + tok.encode("no"), stop_at_eos=False) == "yesno"


def test_chat_template_renders_as_transformers_does(tok_dir, reference):
    tok = HFTokenizer(tok_dir)
    for conv in CONVERSATIONS + [r["messages"] for r in chat_rows(6)]:
        want_text = reference.apply_chat_template(conv, tokenize=False)
        assert tok.render(conv, add_generation_prompt=False) == want_text
        want_ids = reference.apply_chat_template(conv, tokenize=True, return_dict=False)
        ids, mask = tok.encode_conversation(conv)
        assert ids == list(want_ids) and len(mask) == len(ids)
        prompt = conv[: max(i for i, t in enumerate(conv) if t["role"] == "user") + 1]
        want_prompt = reference.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert tok.encode_prompt(prompt) == list(want_prompt)
        assert reference.decode(tok.encode_prompt(prompt)).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("template", ["chatml", "generation_tags"])
def test_the_assistant_mask_covers_each_reply_and_its_end_token_only(tok_dir, tmp_path, template):
    directory = tok_dir
    if template == "generation_tags":
        directory = copy_tokenizer(tok_dir, tmp_path / "gen")
        set_chat_template(directory, GENERATION_TEMPLATE)
    tok = HFTokenizer(directory)
    for conv in CONVERSATIONS:
        ids, mask = tok.encode_conversation(conv)
        masked = [i for i, m in zip(ids, mask) if m]
        replies = [t["content"] for t in conv if t["role"] == "assistant"]
        # exactly each reply followed by <|im_end|>, in order: nothing of the template, no user text
        assert tok._tok.decode(masked) == "".join(r + "<|im_end|>" for r in replies)
        # and they are the tokens the model generates after the generation prompt of the turns before
        last = max(i for i, t in enumerate(conv) if t["role"] == "assistant")
        prompt_ids = tok.encode_prompt(conv[:last])
        assert ids[: len(prompt_ids)] == prompt_ids
        n = sum(mask[len(prompt_ids) :])  # the last reply's tokens start right after its generation prompt
        assert mask[len(prompt_ids) : len(prompt_ids) + n] == [1] * n and ids[len(prompt_ids) + n - 1] == tok.eos_id


def test_a_template_that_rewrites_earlier_turns_is_refused_for_sft(tok_dir, tmp_path):
    d = copy_tokenizer(tok_dir, tmp_path / "rewrite")
    # drops every assistant turn but the last (as reasoning templates drop old thoughts)
    set_chat_template(d, (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ))  # fmt: skip
    with pytest.raises(ValueError, match=r"does not render assistant turn 2 as an extension .* \{% generation %\} tags"):
        HFTokenizer(d).encode_conversation(CONVERSATIONS[1])


def test_fingerprints_equal_for_the_same_files_and_differ_for_one_change(tok_dir, tmp_path):
    base = HFTokenizer(tok_dir)
    same = copy_tokenizer(tok_dir, tmp_path / "same")
    # the same content formatted differently is the same tokenizer
    spec = json.loads((same / "tokenizer.json").read_text())
    (same / "tokenizer.json").write_text(json.dumps(spec, indent=4, sort_keys=True))
    assert HFTokenizer(same).fingerprint == base.fingerprint and tokenizer_difference(base, HFTokenizer(same)) == ""
    assert HFTokenizer(same).fingerprint == load_tokenizer(tmp_path / "same").fingerprint

    merge = copy_tokenizer(tok_dir, tmp_path / "merge")
    a, b = swap_merges(merge, 10)
    other = HFTokenizer(merge)
    assert other.fingerprint != base.fingerprint
    diff = tokenizer_difference(base, other)
    assert diff.startswith("merge 10 is ") and "in the student's" in diff and "in the teacher's" in diff

    added = copy_tokenizer(tok_dir, tmp_path / "added")
    new_id = add_special_token(added, "<|tool|>")
    other = HFTokenizer(added)
    assert new_id == base.vocab_size and other.fingerprint != base.fingerprint
    diff = tokenizer_difference(base, other)
    assert f"token id {new_id} is absent in the student's vocabulary and '<|tool|>' in the teacher's" in diff
    assert f"added token 3 is absent in the student's and '<|tool|>' (id {new_id}, special)" in diff

    template = copy_tokenizer(tok_dir, tmp_path / "template")
    set_chat_template(template, QWEN2_CHAT_TEMPLATE.replace("You are a helpful assistant.", "You are terse."))
    other = HFTokenizer(template)
    assert other.fingerprint != base.fingerprint and other.describe().tokens == base.describe().tokens
    diff = tokenizer_difference(base, other)
    assert diff == (
        "the chat templates differ (line 2, column 9: 'You are a helpful assistant.<|im_end|>' in the student's, "
        "'You are terse.<|im_end|>' in the teacher's)"
    )
    assert "token id" not in diff and "merge" not in diff

    # and the character tokenizer is another kind altogether, named as such
    diff = tokenizer_difference(CharTokenizer(), base)
    assert diff.startswith("the student's is a char tokenizer and the teacher's a hf tokenizer; token id 0 is '<pad>'")


def test_the_digest_a_server_reports_names_the_differing_part(tok_dir, tmp_path):
    from megatron_opd.data.tokenizer import digest_difference

    base = HFTokenizer(tok_dir).describe().digest()
    assert digest_difference(base, json.loads(json.dumps(base))) == ""
    template = copy_tokenizer(tok_dir, tmp_path / "t")
    set_chat_template(template, GENERATION_TEMPLATE)
    assert digest_difference(base, HFTokenizer(template).describe().digest()) == "the chat templates differ"
    added = copy_tokenizer(tok_dir, tmp_path / "a")
    add_special_token(added, "<|tool|>")
    diff = digest_difference(base, HFTokenizer(added).describe().digest())
    assert diff.startswith("the tokens of ids [0, 4096) differ; the student's vocabulary has 360 ids and the teacher's 361")


def test_run_tokenizer_takes_data_tokenizer_and_refuses_one_that_differs(tok_dir, tmp_path):
    from megatron_opd.config import ConfigError
    from megatron_opd.data.hf_tokenizer import HFTokenizer

    # an HF model directory (tokenizer files beside config.json), as train.init_from names it
    init = copy_tokenizer(tok_dir, tmp_path / "init_model")
    assert run_tokenizer(tmp_path / "run", init).fingerprint == HFTokenizer(tok_dir).fingerprint
    assert run_tokenizer(tmp_path / "run", "", tok_dir).fingerprint == HFTokenizer(tok_dir).fingerprint
    other = copy_tokenizer(tok_dir, tmp_path / "other")
    set_chat_template(other, GENERATION_TEMPLATE)
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*other is not train.init_from's .* tokenizer: the chat templates differ"):
        run_tokenizer(tmp_path / "run", init, other)
    # the tiny path is unchanged
    assert run_tokenizer(tmp_path / "run") == CharTokenizer()


def test_a_model_directory_keeps_an_hf_tokenizer_under_hf(tok_dir, tmp_path):
    from megatron_opd.models.config import ModelConfig
    from megatron_opd.models.model_dir import read_model_dir, write_model_dir

    tok = HFTokenizer(tok_dir)
    model = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_attention_heads=2, max_seq_len=64)
    write_model_dir(tmp_path / "m", model, tok)
    assert (tmp_path / "m/hf/tokenizer.json").is_file() and not (tmp_path / "m/tokenizer.json").exists()
    again = read_model_dir(tmp_path / "m").tokenizer
    assert isinstance(again, HFTokenizer) and again.fingerprint == tok.fingerprint
    assert (tmp_path / "m/hf/tokenizer_config.json").read_bytes() == (tok_dir / "tokenizer_config.json").read_bytes()
