"""Weight-merging baselines on megatron checkpoints and on HF directories, through the CLI entry point.

One world of one rank converts three tiny models (a base and two experts of the same
architecture), merges them with `checkpoints_tools.merge.main`, and reads the merged tensors
back; the tests compare them with the formulas computed here, independently. TIES is checked
twice: on experts whose task vectors are a hand-worked example (six entries, the rest zero), and
on the random experts against a float64 reimplementation of the paper's rule.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from test_convert_models import TOKENS, read_safetensors_dir, tiny_hf_model
from test_convert_reshard import _all_tensors


# TIES by hand: three experts = the base + these task vectors at six entries (model.norm.weight[0:3],
# layer 0's down_proj.weight[0, 0:3]), zero elsewhere; the density keeps 3 entries of each.
HAND_TAUS = [
    [4.0, -1.0, 2.0, 0.5, -3.0, 0.125],
    [-2.0, 5.0, 1.0, -0.25, 3.0, 0.25],
    [1.0, -6.0, 0.5, 0.375, -2.0, 0.0625],
]
# trim (top 3 magnitudes of each): e1 keeps  4,  .,  2, ., -3, .   (threshold 2)
#                                  e2 keeps -2,  5,  ., .,  3, .   (threshold 2)
#                                  e3 keeps  1, -6,  ., ., -2, .   (threshold 1)
# elect sign (sign of the sum):             +,  -,  +, 0,  -, 0
# disjoint mean of the agreeing entries: (4+1)/2 (e2's -2 conflicts), -6 (e1's -1 was trimmed),
#   2 (e2's 1 and e3's 0.5 were trimmed), none, (-3-2)/2 (e2's 3 conflicts), none:
HAND_MERGED_TAU = [2.5, -6.0, 2.0, 0.0, -2.5, 0.0]
HAND_THRESHOLDS = [2.0, 2.0, 1.0]
HAND_LAMBDA = 0.5


HAND_NAMES = {
    "hf": ("model.norm.weight", "model.layers.0.mlp.down_proj.weight"),
    "megatron": ("decoder.final_layernorm.weight", "decoder.layers.0.mlp.linear_fc2.weight"),
}


def _hand_entries(tensors: dict, fmt: str) -> list[float]:
    norm, down = HAND_NAMES[fmt]
    return [*tensors[norm][:3].tolist(), *tensors[down][0, :3].tolist()]


def _with_hand_entries(tensors: dict, fmt: str, values: list[float]) -> dict:
    norm, down = HAND_NAMES[fmt]
    out = {k: v.clone() for k, v in tensors.items()}
    out[norm][:3] = torch.tensor(values[:3], dtype=out[norm].dtype)
    out[down][0, :3] = torch.tensor(values[3:], dtype=out[down].dtype)
    return out


def _hand_experts(root: Path) -> float:
    """Writes hand{0,1,2}_hf/_mg; returns the density that keeps 3 entries of each expert."""
    import transformers as T

    from checkpoints_tools.convert import hf_to_megatron

    for i, tau in enumerate(HAND_TAUS):
        model = T.Qwen2ForCausalLM.from_pretrained(root / "base_hf")
        with torch.no_grad():
            model.model.norm.weight[:3] += torch.tensor(tau[:3])
            model.model.layers[0].mlp.down_proj.weight[0, :3] += torch.tensor(tau[3:])
        model.save_pretrained(root / f"hand{i}_hf")
        hf_to_megatron(root / f"hand{i}_hf", root / f"hand{i}_mg", progress=False)
    entries = sum(p.numel() for p in model.parameters())
    return 2.5 / entries  # k = ceil(density * N) = 3


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
        "ties": run(
            "--method", "ties", "--base", root / "base_mg", "--experts", root / "a_mg", root / "b_mg",
            "--output", root / "ties_mg",
        ),  # the defaults: density 0.2, lambda 1
        "ties_hf": run(
            "--method", "ties", "--base", root / "base_hf", "--experts", root / "a_hf", root / "b_hf",
            "--output", root / "ties_hf",
        ),
        "ties_flags_hf": run(
            "--method", "ties", "--base", root / "base_hf", "--experts", root / "a_hf", root / "b_hf",
            "--density", "0.35", "--lambda", "0.7", "--output", root / "ties_flags_hf",
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
    density = _hand_experts(root)
    for fmt in ("mg", "hf"):
        codes[f"hand_{fmt}"] = run(
            "--method", "ties", "--base", root / f"base_{fmt}",
            "--experts", *(root / f"hand{i}_{fmt}" for i in range(3)),
            "--density", repr(density), "--lambda", str(HAND_LAMBDA), "--output", root / f"ties_hand_{fmt}",
        )
    # The HF merge, converted to megatron: a megatron checkpoint and its HF form merge alike.
    hf_to_megatron(root / "ties_hf", root / "ties_hf_as_mg", progress=False)
    from megatron_opd.models.hf.errors import CheckpointError
    import json

    from megatron_opd.models.hf.megatron_io import open_megatron
    from checkpoints_tools.merge import merge

    # Refused over an existing output with overwrite: the old output must survive.
    before = sorted(p.relative_to(root) for p in (root / "uniform_mg").rglob("*"))
    try:
        merge("uniform", [root / "a_mg", root / "other_mg"], root / "uniform_mg", overwrite=True)
        mismatch_message = "no error"
    except CheckpointError as e:
        mismatch_message = str(e)
    kept = before == sorted(p.relative_to(root) for p in (root / "uniform_mg").rglob("*"))
    tensors = {
        name: _all_tensors(root / f"{name}_mg")
        for name in ("base", "a", "b", "uniform", "task", "ties", "ties_hand", "ties_hf_as")
    }
    hf = {
        name: read_safetensors_dir(root / f"{name}_hf")
        for name in ("base", "a", "b", "uniform", "task", "ties", "ties_flags", "ties_hand")
    }
    logits, _ = load_and_forward(str(root / "uniform_mg"), {}, TOKENS)
    return {
        "codes": codes,
        "mismatch_message": mismatch_message,
        "refused_merge_kept_output": kept and bool(before),
        "megatron": tensors,
        "hf": hf,
        "merged_runs": bool(torch.isfinite(logits).all()),
        "manifests": verify_manifest(root / "uniform_mg") + verify_manifest(root / "task_hf")
        + verify_manifest(root / "ties_mg") + verify_manifest(root / "ties_hand_hf"),
        "ties_args": {
            name: json.loads((root / name / "manifest.json").read_text())
            for name in ("ties_mg", "ties_hf", "ties_flags_hf", "ties_hand_mg", "ties_hand_hf")
        },
        "hand_density": density,
        "vocab_size": open_megatron(root / "base_mg").cfg.vocab_size,
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


# -- TIES ------------------------------------------------------------------------------------------


def _model_rows(fmt: str, vocab_size: int):
    """Rows of a tensor that are model entries: a megatron embedding's padding rows are not."""
    from megatron_opd.models.hf.megatron_io import VOCAB_PARAMS

    return lambda name, t: vocab_size if fmt == "megatron" and name in VOCAB_PARAMS else t.shape[0]


def _ties_reference(base: dict, experts: list[dict], density: float, lam: float, rows) -> dict:
    """TIES as the paper states it, on the whole model at once in float64 (each task vector as the
    tool forms it, x - base in float32): flatten each task vector over all tensors, keep its top
    ceil(density * N) magnitudes, elect the sign of the sum, average the entries that agree."""
    names = sorted(base)

    def flat(t: dict) -> torch.Tensor:
        return torch.cat([t[n][: rows(n, t[n])].reshape(-1).float() for n in names])

    b = flat(base)
    taus = torch.stack([(flat(e) - b).double() for e in experts])
    k = math.ceil(density * b.numel())
    kth = taus.abs().sort(dim=1, descending=True).values[:, k - 1 : k]
    trimmed = taus * (taus.abs() >= kth)
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    merged = b.double() + lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    out, at = {}, 0
    for n in names:
        r = rows(n, base[n])
        size = base[n][:r].numel()
        t = base[n].double().clone()
        t[:r] = merged[at : at + size].view_as(t[:r])
        out[n] = t
        at += size
    return out


@pytest.mark.parametrize("fmt", ["megatron", "hf"])
def test_ties_on_a_hand_worked_example(results, fmt):
    """Trim (a parameter trimmed in one expert), sign election (two sign conflicts), disjoint mean."""
    assert results["codes"]["hand_mg" if fmt == "megatron" else "hand_hf"] == 0
    t = results[fmt]
    base, merged = t["base"], t["ties_hand"]
    want = [b + HAND_LAMBDA * m for b, m in zip(_hand_entries(base, fmt), HAND_MERGED_TAU)]
    assert _hand_entries(merged, fmt) == pytest.approx(want, abs=1e-5)
    # Everything else is the base's, exactly: no task vector there.
    expected = _with_hand_entries(base, fmt, _hand_entries(merged, fmt))
    assert sorted(merged) == sorted(base)
    assert all(torch.equal(merged[k], expected[k]) for k in base)
    args = results["ties_args"]["ties_hand_mg" if fmt == "megatron" else "ties_hand_hf"]
    assert args["method"] == "ties" and args["lambda"] == HAND_LAMBDA and args["density"] == results["hand_density"]
    assert args["thresholds"] == pytest.approx(HAND_THRESHOLDS, abs=1e-5)


@pytest.mark.parametrize("run,fmt,density,lam", [("ties", "megatron", 0.2, 1.0), ("ties", "hf", 0.2, 1.0), ("ties_flags", "hf", 0.35, 0.7)])
def test_ties_is_the_papers_rule(results, run, fmt, density, lam):
    t = results[fmt]
    assert results["codes"][run if fmt == "megatron" else f"{run}_hf"] == 0
    rows = _model_rows(fmt, results["vocab_size"])
    want = _ties_reference(t["base"], [t["a"], t["b"]], density, lam, rows)
    assert _max_diff(t[run], want) <= 1e-6
    args = results["ties_args"][f"{run}_mg" if fmt == "megatron" else f"{run}_hf"]
    assert (args["density"], args["lambda"], len(args["thresholds"])) == (density, lam, 2)
    # The trim did something: most entries stay at the base, and TIES is not task arithmetic.
    moved = sum((t[run][k] != t["base"][k]).sum().item() for k in t["base"])
    total = sum(t["base"][k].numel() for k in t["base"])
    assert 0.5 * density < moved / total <= 2 * density
    if fmt == "megatron":  # the vocabulary padding rows stay at the base's
        v = results["vocab_size"]
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert t["ties"][name].shape[0] > v and torch.equal(t["ties"][name][v:], t["base"][name][v:])


def test_ties_merges_a_megatron_checkpoint_and_its_hf_form_alike(results):
    """The same experts merged as megatron checkpoints and as HF directories (then converted):
    the trim counts the same entries, so the thresholds and every merged entry agree."""
    t = results["megatron"]
    args = results["ties_args"]
    assert args["ties_mg"]["thresholds"] == args["ties_hf"]["thresholds"]
    rows = _model_rows("megatron", results["vocab_size"])
    got = {k: v[: rows(k, v)] for k, v in t["ties"].items()}
    want = {k: v[: rows(k, v)] for k, v in t["ties_hf_as"].items()}
    assert _max_diff(got, want) <= 1e-6


def test_ties_refuses_bad_settings(tmp_path, capsys):
    from checkpoints_tools.merge import main as merge_main
    from checkpoints_tools.merge import merge
    from megatron_opd.models.hf.errors import CheckpointError

    experts, out = [tmp_path / "a", tmp_path / "b"], tmp_path / "out"
    cases = [
        (dict(method="ties"), "ties needs --base"),
        (dict(method="ties", base=tmp_path, density=0.0), r"--density 0.0 must lie in \(0, 1\]"),
        (dict(method="ties", base=tmp_path, density=1.5), r"--density 1.5 must lie in \(0, 1\]"),
        (dict(method="ties", base=tmp_path, lam=float("nan")), "--lambda nan must be a finite number"),
        (dict(method="ties", base=tmp_path, weights=[1.0, 1.0]), "--weights/--scale are for task_arithmetic"),
        (dict(method="uniform", density=0.3), "--density/--lambda are for ties, not uniform"),
        (dict(method="task_arithmetic", base=tmp_path, scale=1.0, lam=0.5), "are for ties, not task_arithmetic"),
    ]
    for kwargs, message in cases:
        method = kwargs.pop("method")
        with pytest.raises(CheckpointError, match=message):
            merge(method, experts, out, progress=False, **kwargs)
    assert merge_main(["--method", "ties", "--experts", *map(str, experts), "--output", str(out)]) == 2
    assert "ties needs --base" in capsys.readouterr().err
    assert not out.exists()


def test_merge_help_names_ties_and_its_flags(capsys):
    from megatron_opd.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["merge", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "ties" in text and "--density" in text and "--lambda" in text and "2306.01708" in text
