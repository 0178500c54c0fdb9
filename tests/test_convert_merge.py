"""Weight-merging baselines on megatron checkpoints and on HF directories, through the CLI entry point.

One world of one rank converts three tiny models (a base and two experts of the same
architecture), merges them with `checkpoints_tools.merge.main`, and reads the merged tensors
back; the tests compare them with the formulas computed here, independently.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from test_convert_models import TOKENS, read_safetensors_dir, tiny_hf_model
from test_convert_reshard import _all_tensors


def _world(root: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from checkpoints_tools.convert import hf_to_megatron
    from megatron_opd.models.hf.manifest import verify_manifest
    from checkpoints_tools.merge import main as merge_main
    from checkpoints_tools.verify import load_and_forward

    root = Path(root)
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        tiny_hf_model("qwen2", seed=seed).save_pretrained(root / f"{name}_hf")
        hf_to_megatron(root / f"{name}_hf", root / f"{name}_mg", progress=False)
    tiny_hf_model("qwen3", seed=3).save_pretrained(root / "other_hf")
    hf_to_megatron(root / "other_hf", root / "other_mg", progress=False)

    def run(*argv) -> int:
        return merge_main([*map(str, argv), "--no-progress"])

    codes = {
        "uniform": run(
            "--method", "uniform", "--experts", root / "a_mg", root / "b_mg", "--output", root / "uniform_mg"
        ),
        "task": run(
            "--method",
            "task_arithmetic",
            "--base",
            root / "base_mg",
            "--experts",
            root / "a_mg",
            root / "b_mg",
            "--weights",
            "0.5",
            "0.25",
            "--output",
            root / "task_mg",
        ),
        "uniform_hf": run(
            "--method", "uniform", "--experts", root / "a_hf", root / "b_hf", "--output", root / "uniform_hf"
        ),
        "task_hf": run(
            "--method",
            "task_arithmetic",
            "--base",
            root / "base_hf",
            "--experts",
            root / "a_hf",
            root / "b_hf",
            "--scale",
            "0.3",
            "--output",
            root / "task_hf",
        ),
        "mismatch": run(
            "--method", "uniform", "--experts", root / "a_mg", root / "other_mg", "--output", root / "bad"
        ),
        "no_weights": run(
            "--method",
            "task_arithmetic",
            "--base",
            root / "base_mg",
            "--experts",
            root / "a_mg",
            "--output",
            root / "bad2",
        ),
    }
    from megatron_opd.models.hf.errors import CheckpointError
    from checkpoints_tools.merge import merge

    # Refused over an existing output with overwrite: the old output must survive.
    before = sorted(p.relative_to(root) for p in (root / "uniform_mg").rglob("*"))
    try:
        merge("uniform", [root / "a_mg", root / "other_mg"], root / "uniform_mg", overwrite=True)
        mismatch_message = "no error"
    except CheckpointError as e:
        mismatch_message = str(e)
    kept = before == sorted(p.relative_to(root) for p in (root / "uniform_mg").rglob("*"))
    tensors = {name: _all_tensors(root / f"{name}_mg") for name in ("base", "a", "b", "uniform", "task")}
    hf = {name: read_safetensors_dir(root / f"{name}_hf") for name in ("base", "a", "b", "uniform", "task")}
    logits, _ = load_and_forward(str(root / "uniform_mg"), {}, TOKENS)
    return {
        "codes": codes,
        "mismatch_message": mismatch_message,
        "refused_merge_kept_output": kept and bool(before),
        "megatron": tensors,
        "hf": hf,
        "merged_runs": bool(torch.isfinite(logits).all()),
        "manifests": verify_manifest(root / "uniform_mg") + verify_manifest(root / "task_hf"),
        "model_files": sorted(p.name for p in (root / "uniform_mg").iterdir()),
    }


@functools.lru_cache(maxsize=1)
def _results(root: str) -> dict:
    from megatron_opd.runtime.spawn import spawn_world

    return spawn_world(_world, 1, (root,), timeout_s=300)[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _results(str(tmp_path_factory.mktemp("merge")))


def _max_diff(got: dict, want: dict) -> float:
    assert sorted(got) == sorted(want)
    return max((got[k].float() - want[k].float()).abs().max().item() for k in want)


@pytest.mark.parametrize("fmt", ["megatron", "hf"])
def test_uniform_is_the_elementwise_mean(results, fmt):
    t = results[fmt]
    mean = {k: torch.stack([t["a"][k].double(), t["b"][k].double()]).mean(0) for k in t["a"]}
    assert results["codes"]["uniform" if fmt == "megatron" else "uniform_hf"] == 0
    assert _max_diff(t["uniform"], mean) <= 1e-6
    assert _max_diff(t["uniform"], t["a"]) > 1e-3  # the experts really differ


@pytest.mark.parametrize("fmt", ["megatron", "hf"])
def test_task_arithmetic(results, fmt):
    t = results[fmt]
    w = (0.5, 0.25) if fmt == "megatron" else (0.3, 0.3)
    want = {
        k: t["base"][k].double()
        + w[0] * (t["a"][k].double() - t["base"][k].double())
        + w[1] * (t["b"][k].double() - t["base"][k].double())
        for k in t["base"]
    }
    assert _max_diff(t["task"], want) <= 1e-6


def test_merged_checkpoint_is_a_model_directory(results):
    assert results["merged_runs"]
    assert {"model.yaml", "checkpoints", "hf", "manifest.json"} <= set(results["model_files"])
    assert results["manifests"] == []


def test_merge_refuses_mismatched_inputs(results):
    assert results["codes"]["mismatch"] == 2 and results["codes"]["no_weights"] == 2
    # qwen2 vs qwen3: the message names the config fields that differ.
    assert "qkv_bias" in results["mismatch_message"] and "qk_layernorm" in results["mismatch_message"]
    assert results["refused_merge_kept_output"]
