"""Training from a Hugging Face directory and releasing back to one (issue 15, items 4 and 5).

- `model:` must describe train.init_from's config.json: JobConfig.check() names every key that
  differs (rank-free), prints the section that matches, and leaves training-side keys to the job.
- Round trip: a tiny random transformers model -> `megatron-opd train` (SFT, a few steps, lr > 0)
  with train.init_from=that directory and train.export_hf -> transformers loads the export; its
  logits equal the megatron model's (the run's final checkpoint), fp32 within 1e-4, and
  `generate` works. Qwen2 (untied, QKV bias) at TP=2, Llama (tied) at TP=1.
- Layouts: with lr=0 the export must be the input, tensor for tensor: Llama (tied, whose last
  pipeline stage holds its own output layer) at PP=2 in bf16, and a Qwen3-MoE at EP=2. The
  save and the export go through megatron's own sharded state dict, independently of the in-memory
  loader's naming, so a misplaced layer, expert or output layer shows as a differing tensor; bf16
  also holds that the optimizer's fp32 main parameters follow the loaded weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_model_fixtures import (
    cli,
    megatron_logits,
    model_keys,
    read_tensors,
    tiny_hf_dir,
    transformers_logits,
    write_job,
)

TOKENS = [[1, 14, 15, 42, 7, 35, 19, 29, 32, 38, 46, 26], [1, 21, 22, 21, 12, 34, 9, 4, 12, 35, 36, 2]]


def _char():
    from megatron_opd.data.tokenizer import CharTokenizer

    return CharTokenizer()


def _sft_job(root: Path, hf_dir: Path, *, name: str, parallel: dict, steps: int, lr: float, precision: str = "fp32"):
    tree = {
        "stage": "sft",
        "run": {"name": name, "output_dir": str(root / "runs"), "nproc": 2, "log_every": 1, "progress": "lines"},
        "parallel": parallel,
        "model": model_keys(hf_dir, max_seq_len=32, make_vocab_size_divisible_by=8),
        "train": {
            "steps": steps, "micro_batch_size": 4, "global_batch_size": 8, "precision": precision, "eval_every": 0,
            "optim": {"lr": lr, "min_lr": 0.0, "warmup_steps": 0},
            "init_from": str(hf_dir), "export_hf": str(root / f"{name}-hf"),
        },
        "data": {"domains": ["add", "sort"], "eval_size": 8},
    }  # fmt: skip
    return write_job(root / f"{name}.yaml", tree)


def _train(job: Path) -> None:
    out = cli("train", job)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "released" in out.stdout


# ---------------------------------------------------------------------------------------------
# The model section against config.json (rank-free)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", tokenizer=_char())


def test_model_must_describe_init_from_config_json(qwen2_dir, tmp_path):
    from megatron_opd.config import ConfigError, load_config

    job = write_job(tmp_path / "job.yaml", {"train": {"init_from": str(qwen2_dir)}, "model": {"vocab_size": 51}})
    with pytest.raises(ConfigError) as e:
        load_config(job).check()
    msg = str(e.value)
    for key, ours, theirs in [("num_layers", 2, 4), ("tie_embeddings", True, False), ("qkv_bias", False, True)]:
        assert f"model.{key}={ours!r} but config.json gives {theirs!r}" in msg, msg
    assert "vocab_size" not in msg.split("model: section that matches")[0]  # it agrees: not named
    # The section the error prints is one that passes (with the job's own training-side keys).
    section = msg.split("the model: section that matches is:\n", 1)[1]
    import yaml

    fixed = yaml.safe_load(section)["model"]
    assert fixed["num_layers"] == 4 and fixed["qkv_bias"] is True
    write_job(job, {"train": {"init_from": str(qwen2_dir)}, "model": fixed})
    load_config(job).check()
    # Training-side keys are the job's: a shorter context and another padding pass, a longer one does not.
    load_config(job, ["model.max_seq_len=16", "model.make_vocab_size_divisible_by=8"]).check()
    with pytest.raises(ConfigError, match="model.max_seq_len=256 is beyond train.init_from=.*max_position_embeddings=128"):
        load_config(job, ["model.max_seq_len=256"]).check()
    with pytest.raises(ConfigError, match=r"model.rope_theta=10000.0 but config.json gives 50000.0"):
        load_config(job, ["model.rope_theta=10000.0"]).check()


def test_export_hf_must_not_overlap_an_input(qwen2_dir, tmp_path):
    from megatron_opd.config import ConfigError, load_config

    base = [f"run.output_dir={tmp_path / 'runs'}", "run.name=r"]
    with pytest.raises(ConfigError, match=r"train.export_hf=.* overlaps the run directory"):
        load_config(None, [*base, f"train.export_hf={tmp_path / 'runs' / 'r' / 'release'}"]).check()
    with pytest.raises(ConfigError, match=r"train.export_hf=.* overlaps train.init_from"):
        load_config(None, [*base, f"train.init_from={tmp_path / 'init'}", f"train.export_hf={tmp_path / 'init'}"]).check()
    load_config(None, [*base, f"train.export_hf={tmp_path / 'release'}"]).check()
    # An existing directory is replaced only when it is an earlier release (the export's manifest).
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"train.export_hf=.* exists, is not empty and is not a release"):
        load_config(None, [*base, f"train.export_hf={tmp_path / 'release'}"]).check()
    (tmp_path / "release" / "manifest.json").write_text("{}")
    load_config(None, [*base, f"train.export_hf={tmp_path / 'release'}"]).check()


def test_export_hf_may_change_on_resume():
    from megatron_opd.stages.run_dir import rule_for

    assert rule_for("train.export_hf")[0] == "changeable"


# ---------------------------------------------------------------------------------------------
# HF -> train -> export -> transformers


@pytest.mark.parametrize(("arch", "tp"), [("qwen2", 2), ("llama", 1)])
def test_round_trip_logits_equal_the_megatron_models(arch, tp, tmp_path):
    hf_dir = tiny_hf_dir(tmp_path / arch, arch, tokenizer=_char(), seed=3)
    job = _sft_job(tmp_path, hf_dir, name=f"{arch}-tp{tp}", parallel={"tp": tp}, steps=3, lr=1e-2)
    _train(job)
    run, release = tmp_path / "runs" / f"{arch}-tp{tp}", tmp_path / f"{arch}-tp{tp}-hf"
    assert (run / "hf" / "config.json").read_text() == (hf_dir / "config.json").read_text()  # kept for the release
    ours = megatron_logits(run, TOKENS)
    theirs = transformers_logits(release, TOKENS)
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert (theirs - transformers_logits(hf_dir, TOKENS)).abs().max().item() > 1e-3  # it did train
    # A release: the original config.json (the job trained at a shorter context), the tokenizer,
    # and a model that generates.
    assert json.loads((release / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    assert (release / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()
    assert (release / "manifest.json").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    out = model.generate(torch.tensor(TOKENS[:1]), max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert out.shape == (1, len(TOKENS[0]) + 5)


@pytest.mark.parametrize(
    ("arch", "parallel", "precision"),
    [("llama", {"pp": 2}, "bf16"), ("qwen3_moe", {"ep": 2}, "fp32")],
    ids=["llama-pp2-bf16", "qwen3_moe-ep2"],
)
def test_init_from_under_pp_and_ep_loads_every_tensor_in_place(arch, parallel, precision, tmp_path):
    hf_dir = tiny_hf_dir(tmp_path / arch, arch, tokenizer=_char(), seed=5)
    name = f"{arch}-{'-'.join(f'{k}{v}' for k, v in parallel.items())}"
    _train(_sft_job(tmp_path, hf_dir, name=name, parallel=parallel, steps=1, lr=0.0, precision=precision))
    original, exported = read_tensors(hf_dir), read_tensors(tmp_path / f"{name}-hf")
    if "lm_head.weight" in original and "lm_head.weight" not in exported:  # tied
        original.pop("lm_head.weight")
    assert sorted(exported) == sorted(original)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    differ = [k for k in original if not torch.equal(exported[k], original[k].to(dtype))]
    assert differ == []


def test_the_runtime_imports_no_checkpoints_tools():
    """The HF <-> megatron tables live in megatron_opd/models/; checkpoints_tools/ is only the
    command line over them: no module of the package imports it, at module level or lazily
    (cli.py, the command line itself, dispatches to it by name)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "megatron_opd"
    found = []
    for path in sorted(p for p in root.rglob("*.py") if p.name != "cli.py" or p.parent != root):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "checkpoints_tools"]
    assert found == []


def test_megatron_opd_run_serves_hf_teachers_as_they_are(qwen2_dir, tmp_path):
    """`megatron-opd run` trains an expert only when its teachers.<name>.model_dir holds none: an
    HF directory is served as it is (never trained into, nothing written there)."""
    from launchers.local import run_sft_jobs, sft_jobs
    from megatron_opd.config import derive, load_config

    before = sorted(p.name for p in qwen2_dir.iterdir())
    cfg = derive(load_config(Path(__file__).resolve().parents[1] / "configs/tiny/opd.yaml"), [f"run.output_dir={tmp_path}"],
                 teachers={n: {"model_dir": str(qwen2_dir)} for n in ("arithmetic", "reversal", "sorting")})  # fmt: skip
    experts, _ = sft_jobs(cfg)
    assert sorted(experts) == ["arithmetic", "reversal", "sorting"]
    assert run_sft_jobs(experts, 1) == []
    assert sorted(p.name for p in qwen2_dir.iterdir()) == before
