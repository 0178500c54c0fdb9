"""SFT from a JSONL `messages` file with a Hugging Face tokenizer (a BPE trained here, ChatML
template): the loss covers the assistant's tokens only, micro-batches are length-bucketed, and the
`megatron-opd train` command trains from such a file end to end (real ranks, real files), refusing
a bad row with its file and line before any step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fixtures import chat_rows, make_bpe_tokenizer, write_jsonl
from megatron_opd.data.hf_tokenizer import HFTokenizer
from megatron_opd.data.prompts import Demonstration, Prompt
from megatron_opd.stages.sft import conversation_micro_batches, encode_demonstrations

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "bpe")


def _demos(rows) -> list[Demonstration]:
    return [Demonstration(Prompt("", "chat", f"chat/{i}"), tuple(r["messages"])) for i, r in enumerate(rows)]


def test_the_loss_mask_is_on_the_assistants_tokens_and_buckets_pad_little(tok_dir):
    tok = HFTokenizer(tok_dir)
    rows = chat_rows(12, turns=3)
    examples = encode_demonstrations(_demos(rows), tok, max_len=256)
    lengths = [len(ids) for ids, _ in examples]
    assert max(lengths) > min(lengths) + 16  # conversations of 1 to 3 exchanges: worth bucketing
    for bucket in (True, False):
        mbs = conversation_micro_batches(examples, 4, tok.pad_id, 256, bucket=bucket)
        seen = []
        for mb in mbs:
            w = mb.tokens.shape[1]
            assert w % 8 == 0 and mb.data["labels"].shape == mb.data["loss_mask"].shape == (mb.tokens.shape[0], w)
            for b in range(mb.tokens.shape[0]):
                n = int((mb.tokens[b] != tok.pad_id).sum())  # pad is <|endoftext|>, never inside a conversation
                k = next(i for i, (ids, _) in enumerate(examples) if ids == mb.tokens[b, :n].tolist() and i not in seen)
                seen.append(k)
                # the trained labels are exactly the assistant replies, each with its <|im_end|>
                mask = mb.data["loss_mask"][b].bool()
                trained = mb.data["labels"][b][mask].tolist()
                replies = [t["content"] for t in rows[k]["messages"] if t["role"] == "assistant"]
                assert tok._tok.decode(trained) == "".join(r + "<|im_end|>" for r in replies)
                assert not mask[n - 1 :].any()  # nothing past the row's last token is predicted
        assert sorted(seen) == list(range(len(examples)))
        widths = [mb.tokens.shape[1] for mb in mbs]
        if bucket:  # longest first, each as wide as its own longest row
            assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0]
            assert sum(w * mb.tokens.shape[0] for w, mb in zip(widths, mbs)) < len(examples) * widths[0]
        else:
            assert len(set(widths)) == 1
    too_long = encode_demonstrations
    with pytest.raises(ValueError, match=r"chat/0: the conversation is \d+ tokens, over model.max_seq_len=8"):
        too_long(_demos(rows[:1]), tok, max_len=8)


def _train(tmp_path: Path, data_file: Path, tok_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`megatron-opd train` on a job file as a user writes one (data.datasets is a list of files)."""
    job = {
        "stage": "sft",
        "run": {"name": "hf", "output_dir": str(tmp_path), "nproc": 1, "progress": "none", "log_every": 1},
        "model": {"vocab_size": HFTokenizer(tok_dir).vocab_size, "hidden_size": 64, "num_layers": 2,
                  "num_attention_heads": 4, "ffn_hidden_size": 128, "max_seq_len": 128},
        "train": {"steps": 12, "micro_batch_size": 8, "global_batch_size": 16, "eval_every": 0, "checkpoint_every": 12,
                  "optim": {"lr": 5e-3, "warmup_steps": 0}},
        "data": {"tokenizer": str(tok_dir), "datasets": [{"path": str(data_file), "domain": "chat"}]},
    }  # fmt: skip
    config = tmp_path / f"{data_file.stem}.yaml"
    config.write_text(json.dumps(job))  # JSON is YAML
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "megatron_opd.cli", "train", str(config), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_sft_trains_from_a_jsonl_messages_file_with_an_hf_tokenizer(tok_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(64))
    out = _train(tmp_path, data, tok_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "hf"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.75 * losses[0], losses
    # the run directory is a model directory with the HF tokenizer beside it
    from megatron_opd.data.tokenizer import load_tokenizer

    assert (run / "hf/tokenizer_config.json").is_file()
    assert load_tokenizer(run).fingerprint == HFTokenizer(tok_dir).fingerprint
    assert json.loads((run / "summary.json").read_text())["data/dropped_rows"] == 0.0



def test_a_bad_row_stops_the_command_before_any_rank_starts(tok_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", chat_rows(5) + ['{"messages": [{"role": "user", "content": "hi"}]}'])
    out = _train(tmp_path, bad, tok_dir)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: {bad}:6: SFT needs the assistant's reply: 'messages' ending with an assistant turn, or 'prompt' with "
        f"'completion'; fix the row, or set data.bad_rows=drop to leave such rows out (their count is reported)"
    ]
    assert not (tmp_path / "hf").exists()  # nothing written
