"""A release carries the tokenizer and chat template: transformers loads them and generates (issue 15, item 5).

A tiny Qwen2 model with a byte-level BPE tokenizer trained here with `tokenizers` and a ChatML
chat template (tokenizer.json, tokenizer_config.json, generation_config.json) ->
checkpoints_tools.convert (a megatron model directory; the HF files kept in hf/) ->
models/hf/export.py megatron_to_hf, which a stage's release (stages/release.py) runs -> the
release's AutoTokenizer renders conversations exactly as the original's, and the model
generates from them the original's greedy tokens.

The tokenizer is built here, not through megatron-opd's tokenizer (data/hf_tokenizer.py, branch
hf-data, not on main yet): the release copies tokenizer files; it does not interpret them.
Once that lands, `_bpe_tokenizer_dir` is tests/hf_fixtures.py make_bpe_tokenizer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from hf_model_fixtures import REPO, tiny_hf_model

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 plus 3?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Sort 3 1 2, please!"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
     {"role": "user", "content": "count the letters"}],
]  # fmt: skip


def _bpe_tokenizer_dir(directory: Path) -> Path:
    """A byte-level BPE trained on local text, saved with its chat template (see the docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"What is {a} plus {b}? The answer is {a + b}. Sort {b} {a} in order, please!" for a in range(30) for b in range(7)]
    text += ["hello world, you are a helpful assistant; count the letters and answer briefly"] * 20
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    )  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    ids = [fast.convert_tokens_to_ids(t) for t in special]
    GenerationConfig(eos_token_id=[ids[2], ids[0]], pad_token_id=ids[0]).save_pretrained(directory)
    return directory


def test_release_carries_the_tokenizer_and_chat_template_that_transformers_generates_with(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_opd.models.hf.export import megatron_to_hf

    hf_dir = _bpe_tokenizer_dir(tmp_path / "hf")
    bare = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = tiny_hf_model("qwen2", vocab_size=len(bare), seed=2, layers=2,
                          eos_token_id=bare.eos_token_id, pad_token_id=bare.pad_token_id)  # fmt: skip
    model.save_pretrained(hf_dir)
    # Loaded beside config.json, as the release is: transformers then picks the tokenizer class of
    # its model_type (Qwen2Tokenizer splits digits apart), so the directories compare like for like.
    original_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    megatron_dir = tmp_path / "megatron"
    convert = [sys.executable, "-m", "checkpoints_tools.convert", "--source", "hf", "--target", "megatron",
               "--input", str(hf_dir), "--output", str(megatron_dir), "--no-progress"]  # fmt: skip
    done = subprocess.run(convert, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (megatron_dir / "tokenizer_config.json").exists()  # the HF files live in hf/

    release = megatron_to_hf(megatron_dir, tmp_path / "release")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (release / name).read_bytes() == (hf_dir / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(release, local_files_only=True)
    released = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    for conversation in CONVERSATIONS:
        ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == original_tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tok.decode(ids).endswith("<|im_start|>assistant\n")
        prompt = torch.tensor([ids])
        out = released.generate(prompt, max_new_tokens=6, do_sample=False)
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, want) and out.shape[1] > prompt.shape[1]
        assert isinstance(tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True), str)
