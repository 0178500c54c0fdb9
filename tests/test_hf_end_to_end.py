"""From Hugging Face checkpoints to a Hugging Face release, through the `megatron-opd` CLI (issue 15).

A tiny random Qwen2 student and a tiny random Qwen2 teacher (another seed), both made with
transformers and saved as HF directories (config.json + safetensors, no megatron files):

    student HF dir --SFT (train.init_from=HF dir, TP=1)--> run dir
      --OPD (TP=2, train.init_from=the SFT run; teacher served from its HF dir, hidden states,
             the trainer applies the teacher's output layer read from that HF dir)
      --train.export_hf--> release --> transformers: logits equal the megatron model's (fp32,
                                        1e-4), generate, and the original config.json and
                                        tokenizer files beside the weights

Tokenizer: the character tokenizer (its tokenizer.json in the HF directories), because
megatron-opd loads Hugging Face tokenizers only once data/hf_tokenizer.py lands (branch
hf-data). `e2e_tokenizer` is the one place to change then; the release's tokenizer files are
checked to be the origin's, byte for byte, whatever they are. That transformers loads a released
BPE tokenizer with its chat template and generates from the rendered conversation is held
without the runtime's tokenizer by test_hf_release.py.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch

from hf_model_fixtures import cli, megatron_logits, model_keys, tiny_hf_dir, transformers_logits, write_job

TOKENS = [[1, 14, 15, 42, 7, 35, 19, 29, 32, 38, 46, 26], [1, 21, 22, 21, 12, 34, 9, 4, 12, 35, 36, 2]]


def e2e_tokenizer():
    """The tokenizer both HF directories carry (see the module docstring)."""
    from megatron_opd.data.tokenizer import CharTokenizer

    return CharTokenizer()


def _train(job: Path) -> str:
    out = cli("train", job)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture
def teacher(tmp_path):
    from megatron_opd.serving.launch import start_teacher_server

    d = tiny_hf_dir(tmp_path / "teacher-hf", "qwen2", tokenizer=e2e_tokenizer(), seed=11, layers=2)
    server = start_teacher_server(model_dir=d)
    try:
        yield d, server
    finally:
        server.stop()


def test_hf_student_sft_then_opd_against_an_hf_teacher_then_release(teacher, tmp_path):
    from megatron_opd.models.model_dir import read_model_dir

    teacher_dir, server = teacher
    student = tiny_hf_dir(tmp_path / "student-hf", "qwen2", tokenizer=e2e_tokenizer(), seed=7, layers=2)
    model = model_keys(student, max_seq_len=32, make_vocab_size_divisible_by=8)
    runs = tmp_path / "runs"
    common = {"output_dir": str(runs), "log_every": 1, "progress": "lines"}
    optim = {"lr": 1e-2, "min_lr": 0.0, "warmup_steps": 0}

    # The teacher server reports the identity of the HF weights it loaded: what the pool compares
    # with that of teachers.t.model_dir (the directory the trainer reads the output layer from).
    with urllib.request.urlopen(f"{server.url}/model_info", timeout=30) as r:
        served = json.loads(r.read())["checkpoint_id"]
    assert served == read_model_dir(teacher_dir).weights_id() and served.startswith("hf-")
    assert served != read_model_dir(student).weights_id()  # another model: another id

    sft = {
        "stage": "sft",
        "run": {"name": "sft", "nproc": 1, **common},
        "model": model,
        "train": {"steps": 2, "micro_batch_size": 8, "global_batch_size": 8, "eval_every": 0, "optim": optim,
                  "init_from": str(student)},
        "data": {"domains": ["add"], "eval_size": 4},
    }  # fmt: skip
    _train(write_job(tmp_path / "sft.yaml", sft))
    sft_run = runs / "sft"
    assert (sft_run / "hf" / "config.json").read_bytes() == (student / "config.json").read_bytes()

    release = tmp_path / "release"
    opd = {
        "stage": "opd",
        "run": {"name": "opd", "nproc": 2, **common},
        "parallel": {"tp": 2},
        "model": model,
        "train": {"steps": 2, "micro_batch_size": 4, "global_batch_size": 8, "eval_every": 0, "optim": optim,
                  "init_from": str(sft_run), "export_hf": str(release)},
        "data": {"domains": ["add"], "eval_size": 4},
        "teachers": {"t": {"endpoints": [server.url], "model_dir": str(teacher_dir), "domains": ["add"],
                           "signal": "hidden", "batch_size": 8}},
        "rollout": {"engine": "embedded", "max_new_tokens": 4},
    }  # fmt: skip
    out = _train(write_job(tmp_path / "opd.yaml", opd))
    assert f"in {release}" in out and "released" in out
    metrics = [json.loads(line) for line in (runs / "opd" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["train/kl/t"] for r in metrics if "train/kl/t" in r]
    assert len(kl) == 2 and all(v == v and v > 0 for v in kl)

    # The release is the OPD run's final model, in the student's own HF form.
    ours = megatron_logits(runs / "opd", TOKENS)
    theirs = transformers_logits(release, TOKENS)
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert (theirs - transformers_logits(student, TOKENS)).abs().max().item() > 1e-3  # it trained
    assert json.loads((release / "config.json").read_text()) == json.loads((student / "config.json").read_text())
    assert (release / "tokenizer.json").read_bytes() == (student / "tokenizer.json").read_bytes()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    generated = hf.generate(torch.tensor(TOKENS[:1]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert generated.shape == (1, len(TOKENS[0]) + 4)
