"""The checkpoint tools never destroy their inputs or a previous output, name corrupt files, check
manifests and write world-readable outputs (issue 11).

One world of one rank converts two tiny qwen2 models and then probes, through the same entry
point users run (`megatron-opd convert | export | reshard | merge`, megatron_opd.cli.main):

- an output that is, contains or is inside an input (also through a symlink or a relative path)
  is refused with exit status 2 and every input byte is left as it was;
- `--overwrite` over an existing output that then fails (a corrupt input) leaves the old output
  intact, and one that succeeds replaces it with no temporary directory left behind;
- a truncated or garbled file of a checkpoint is named, with the checkpoint to fall back to, both
  by runtime.checkpoint.load_checkpoint and by the tools; a checkpoint of another model is not
  called corrupt;
- a file that no longer matches the input's manifest.json is refused by convert, naming it;
- outputs are 0644 files in 0755 directories even under umask 077.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import stat
from pathlib import Path

import pytest

from test_convert_models import tiny_hf_model

STEP0 = "checkpoints/step_00000000"


def _digest(root: Path) -> dict[str, str]:
    """Every entry under root: file contents' sha256, 'dir', or a symlink's target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _cli(*argv) -> tuple[int | str, str]:
    """(exit status, stderr) of `megatron-opd ARGV --no-progress`; an escaped exception is reported."""
    from megatron_opd.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc: int | str = main([*map(str, argv), "--no-progress"])
        except BaseException as e:  # noqa: BLE001 - the old code raised tracebacks here
            rc = f"raised {type(e).__name__}: {e}"
    return rc, err.getvalue()


def _truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _overlap_probes(root: Path) -> dict:
    """Each probe runs in its own copy of the inputs; the copy must be byte-identical afterwards."""
    def sandbox(name: str, *dirs: str) -> Path:
        s = root / "overlap" / name
        for d in dirs:
            shutil.copytree(root / d, s / d, symlinks=True)
        return s

    probes = {}

    def probe(name: str, dirs: tuple[str, ...], make_argv) -> None:
        s = sandbox(name, *dirs)
        argv = make_argv(s)
        before = _digest(s)
        rc, err = _cli(*argv, "--overwrite")
        probes[name] = {"rc": rc, "error": err, "untouched": _digest(s) == before}

    probe("reshard output is input", ("M",), lambda s: ("reshard", "--input", s / "M", "--output", s / "M", "--tp", 2))
    probe("reshard output contains input", ("M",),
          lambda s: ("reshard", "--input", s / "M" / STEP0, "--output", s / "M"))
    probe("reshard output inside input", ("M",),
          lambda s: ("reshard", "--input", s / "M", "--output", s / "M" / "tp2", "--tp", 2))

    s = sandbox("reshard output is a symlink to input", "M")
    (s / "link").symlink_to(s / "M")
    before = _digest(s)
    rc, err = _cli("reshard", "--input", s / "M", "--output", s / "link", "--overwrite")
    probes["reshard output is a symlink to input"] = {"rc": rc, "error": err, "untouched": _digest(s) == before}

    s = sandbox("reshard relative output", "M")
    before, cwd = _digest(s), os.getcwd()
    os.chdir(s / "M" / "checkpoints")
    try:
        rc, err = _cli("reshard", "--input", s / "M", "--output", "..", "--overwrite")
    finally:
        os.chdir(cwd)
    probes["reshard relative output"] = {"rc": rc, "error": err, "untouched": _digest(s) == before}

    probe("export output is input", ("M",), lambda s: ("export", "--input", s / "M", "--output", s / "M"))
    probe("export output contains input", ("M",),
          lambda s: ("export", "--input", s / "M" / STEP0, "--output", s / "M" / "checkpoints"))
    probe("convert hf output is input", ("hf",),
          lambda s: ("convert", "--source", "hf", "--target", "megatron", "--input", s / "hf", "--output", s / "hf"))
    probe("convert hf output contains input", ("hf",),
          lambda s: ("convert", "--source", "hf", "--target", "megatron", "--input", s / "hf", "--output", s))
    probe("convert megatron output is input", ("M",),
          lambda s: ("convert", "--source", "megatron", "--target", "hf", "--input", s / "M", "--output", s / "M"))
    probe("merge output is an expert", ("M", "Mb"),
          lambda s: ("merge", "--method", "uniform", "--experts", s / "M", s / "Mb", "--output", s / "Mb"))
    probe("merge output contains the base", ("M", "Mb"),
          lambda s: ("merge", "--method", "task_arithmetic", "--base", s / "M", "--experts", s / "Mb",
                     "--scale", 0.5, "--output", s))
    probe("merge hf output is an expert", ("hf", "hf_b"),
          lambda s: ("merge", "--method", "uniform", "--experts", s / "hf", s / "hf_b", "--output", s / "hf"))
    return probes


def _overwrite_probes(root: Path) -> dict:
    """A failed --overwrite keeps the old output; a successful one swaps the new one in."""
    bad = root / "bad"
    shutil.copytree(root / "M", bad)
    (bad / "manifest.json").unlink()  # so that the tools fail while writing, not before
    _truncate(bad / STEP0 / "__0_0.distcp")
    out = {}
    for tool, argv in (
        ("reshard", ("reshard", "--input", root / "M", "--output", root / "old_reshard")),
        ("export", ("export", "--input", root / "M", "--output", root / "old_export")),
    ):
        assert _cli(*argv)[0] == 0
        target = root / f"old_{tool}"
        before = _digest(target)
        bad_argv = [bad if a == root / "M" else a for a in argv]
        rc, err = _cli(*bad_argv, "--overwrite")
        out[f"failed {tool}"] = {
            "rc": rc,
            "failed_reading": "__0_0.distcp is corrupt" in err,
            "error": err,
            "kept": _digest(target) == before,
            "leftovers": sorted(p.name for p in root.iterdir() if p.name.startswith(f".old_{tool}")),
        }
    from megatron_opd.models.hf.manifest import verify_manifest

    rc, err = _cli("reshard", "--input", root / "M", "--output", root / "old_reshard", "--tp", 2, "--overwrite")
    manifest = (root / "old_reshard" / "manifest.json").read_text()
    out["replaced reshard"] = {
        "rc": rc,
        "error": err,
        "tp2": '"tp": 2' in manifest,
        "manifest_problems": verify_manifest(root / "old_reshard"),
        "leftovers": sorted(p.name for p in root.iterdir() if p.name.startswith(".")),
    }
    return out


def _corruption_probes(root: Path) -> dict:
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.hf.megatron_io import read_model_yaml
    from megatron_opd.runtime.checkpoint import load_checkpoint
    from megatron_opd.runtime.layout import ParallelLayout

    cfg = read_model_yaml(root / "M" / "model.yaml")
    net = build_gpt_model(cfg, ParallelLayout())

    def load(step_dir: Path, model=net) -> str:
        try:
            load_checkpoint(step_dir, [model], load_rng=False)
        except BaseException as e:  # noqa: BLE001 - the message is what is checked (DCP's errors are BaseExceptions)
            return f"{type(e).__name__}: {e}"
        return "loaded"

    # Two checkpoints; a shard of the newer one is truncated.
    two = root / "two"
    shutil.copytree(root / "M", two)
    shutil.copytree(two / STEP0, two / "checkpoints" / "step_00000040")
    shard = two / "checkpoints" / "step_00000040" / "__0_0.distcp"
    _truncate(shard)
    # One checkpoint whose .metadata is garbled (same size).
    one = root / "one"
    shutil.copytree(root / "M", one)
    metadata = one / STEP0 / ".metadata"
    _flip_byte(metadata, metadata.stat().st_size // 2)
    # A checkpoint of another model (a wider one) is not corrupt.
    import dataclasses

    wider = build_gpt_model(dataclasses.replace(cfg, hidden_size=cfg.hidden_size * 2), ParallelLayout())
    rc, tool_err = _cli("export", "--input", two, "--output", root / "two_hf")
    return {
        "shard": str(shard),
        "fallback": str(two / STEP0),
        "metadata": str(metadata),
        "load truncated shard": load(two / "checkpoints" / "step_00000040"),
        "load garbled metadata": load(one / STEP0),
        "load intact": load(root / "M" / STEP0),
        "load other model": load(root / "M" / STEP0, wider),
        "tool rc": rc,
        "tool error": tool_err,
    }


def _manifest_probes(root: Path) -> dict:
    out = {}
    assert _cli("export", "--input", root / "M", "--output", root / "exported")[0] == 0
    changed = root / "exported_changed"
    shutil.copytree(root / "exported", changed)
    shard = next(changed.glob("model-*.safetensors"))
    _flip_byte(shard, shard.stat().st_size - 10)  # a weight byte: the file still parses
    out["hf"] = (
        _cli("convert", "--source", "hf", "--target", "megatron", "--input", changed, "--output", root / "x1"),
        shard.name,
    )
    changed_mg = root / "M_changed"
    shutil.copytree(root / "M", changed_mg)
    distcp = changed_mg / STEP0 / "__0_1.distcp"
    _flip_byte(distcp, distcp.stat().st_size - 10)
    out["megatron"] = (
        _cli("convert", "--source", "megatron", "--target", "hf", "--input", changed_mg, "--output", root / "x2"),
        "__0_1.distcp",
    )
    out["intact"] = _cli(
        "convert", "--source", "hf", "--target", "megatron", "--input", root / "exported", "--output", root / "x3"
    )[0]
    return out


def _mode_probes(root: Path) -> dict:
    old = os.umask(0o077)
    try:
        codes = [
            _cli("export", "--input", root / "M", "--output", root / "release")[0],
            _cli("convert", "--source", "hf", "--target", "megatron", "--input", root / "hf",
                 "--output", root / "imported")[0],
        ]
    finally:
        os.umask(old)
    modes = {}
    for top in ("release", "imported"):
        for p in [root / top, *(root / top).rglob("*")]:
            modes[str(p.relative_to(root))] = (p.is_dir(), stat.S_IMODE(p.stat().st_mode))
    return {"codes": codes, "modes": modes}


def _world(root: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from checkpoints_tools.convert import hf_to_megatron

    root = Path(root)
    tiny_hf_model("qwen2").save_pretrained(root / "hf")
    tiny_hf_model("qwen2", seed=1).save_pretrained(root / "hf_b")
    hf_to_megatron(root / "hf", root / "M", progress=False)
    hf_to_megatron(root / "hf_b", root / "Mb", progress=False)
    return {
        "overlap": _overlap_probes(root),
        "overwrite": _overwrite_probes(root),
        "corruption": _corruption_probes(root),
        "manifest": _manifest_probes(root),
        "modes": _mode_probes(root),
    }


@functools.lru_cache(maxsize=1)
def _results(root: str) -> dict:
    from megatron_opd.runtime.spawn import spawn_world

    return spawn_world(_world, 1, (root,), timeout_s=600)[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _results(str(tmp_path_factory.mktemp("safety")))


OVERLAPS = (
    "reshard output is input",
    "reshard output contains input",
    "reshard output inside input",
    "reshard output is a symlink to input",
    "reshard relative output",
    "export output is input",
    "export output contains input",
    "convert hf output is input",
    "convert hf output contains input",
    "convert megatron output is input",
    "merge output is an expert",
    "merge output contains the base",
    "merge hf output is an expert",
)


@pytest.mark.parametrize("probe", OVERLAPS)
def test_an_output_overlapping_an_input_is_refused_before_anything_is_touched(results, probe):
    r = results["overlap"][probe]
    assert r["rc"] == 2, r
    assert "error:" in r["error"] and "--output" in r["error"] and "Traceback" not in r["error"], r["error"]
    assert r["untouched"], f"{probe}: the inputs changed"


@pytest.mark.parametrize("tool", ["reshard", "export"])
def test_a_failed_overwrite_keeps_the_old_output(results, tool):
    r = results["overwrite"][f"failed {tool}"]
    assert r["rc"] == 2 and r["failed_reading"], r
    assert r["kept"], f"{tool} --overwrite that failed changed the old output"
    assert r["leftovers"] == [], r["leftovers"]


def test_a_successful_overwrite_replaces_the_output_completely(results):
    r = results["overwrite"]["replaced reshard"]
    assert r["rc"] == 0, r["error"]
    assert r["tp2"] and r["manifest_problems"] == []
    assert r["leftovers"] == [], r["leftovers"]


def test_a_corrupt_shard_is_named_with_the_checkpoint_to_fall_back_to(results):
    r = results["corruption"]
    msg = r["load truncated shard"]
    assert r["shard"] in msg and "corrupt" in msg, msg
    assert r["fallback"] in msg and "train.init_from" in msg, msg
    msg = r["load garbled metadata"]
    assert r["metadata"] in msg and "corrupt" in msg and "no earlier complete checkpoint" in msg, msg
    assert r["tool rc"] == 2 and r["shard"] in r["tool error"] and r["fallback"] in r["tool error"], r["tool error"]
    assert "Traceback" not in r["tool error"]


def test_an_intact_checkpoint_of_another_model_is_not_called_corrupt(results):
    r = results["corruption"]
    assert r["load intact"] == "loaded"
    assert r["load other model"] != "loaded" and "corrupt" not in r["load other model"]


@pytest.mark.parametrize("kind", ["hf", "megatron"])
def test_convert_checks_the_input_manifest(results, kind):
    (rc, err), name = results["manifest"][kind]
    assert rc == 2, err
    assert name in err and "manifest.json" in err and "Traceback" not in err, err
    assert results["manifest"]["intact"] == 0


def test_outputs_are_world_readable_whatever_the_umask(results):
    r = results["modes"]
    assert r["codes"] == [0, 0]
    wrong = {p: oct(m) for p, (is_dir, m) in r["modes"].items() if m != (0o755 if is_dir else 0o644)}
    assert wrong == {}
