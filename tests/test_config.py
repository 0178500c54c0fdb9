"""The config tree: typed keys, one rank-free check before launch, the stage registry, no secrets.

- keys, types and values are refused with the dotted key (and the closest valid key, or the fix);
- `JobConfig.check()` runs before any rank starts, under `megatron-opd train` (also with a
  torchrun environment), `run` and `submit`, and the CLI prints `error: <one line>`, exit 2;
- the tree imports no torch, megatron or numpy: `submit --dry-run` renders where they are absent
  (an import blocker, and a real venv without them);
- every shipped config passes the check of the command that runs it;
- API keys are named by environment variable or file, and never written into a run's files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from megatron_opd.config import STAGES, ConfigError, JobConfig, build, derive, dump_config, load_config, to_dict
from megatron_opd.models.config import ModelConfig
from megatron_opd.runtime.layout import LayoutError, ParallelLayout
from megatron_opd.runtime.secrets import SecretError
from megatron_opd.teachers.config import TeacherConfig

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = REPO / "configs/tiny/sft.yaml"
TINY_OPD = REPO / "configs/tiny/opd.yaml"


def _cli(*args: str, cwd: Path, env: dict | None = None, pythonpath: str = str(REPO), timeout: int = 300, python=sys.executable):
    """`megatron-opd ARGS` in a subprocess run from `cwd` (not the repo: `-m` puts cwd on sys.path)."""
    full_env = dict(os.environ if env is None else env, PYTHONPATH=pythonpath)
    return subprocess.run(
        [str(python), "-m", "megatron_opd.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    """The CLI's answer to a config error: status 2, exactly `error: <one line>` on stderr."""
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Keys and types


def test_yaml_and_overrides_build_typed_tree(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\ntrain:\n  steps: 7\n  optim:\n    lr: 1.0e-3\nparallel:\n  tp: 2\n")
    cfg = load_config(path, ["train.optim.lr=3e-4", "model.moe_layer_freq=[0,1]", "run.name=x"])
    assert isinstance(cfg, JobConfig)
    assert cfg.train.steps == 7 and cfg.train.optim.lr == pytest.approx(3e-4)
    assert cfg.parallel == ParallelLayout(tp=2)
    assert cfg.model.moe_layer_freq == [0, 1]
    assert build(JobConfig, to_dict(cfg)) == cfg  # a dumped config loads back unchanged


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optim.lrr=1", "unknown config key 'train.optim.lrr'; did you mean 'train.optim.lr'?"),
        ("trian.steps=3", "unknown config key 'trian'; did you mean 'train'?"),
        ("model.num_layres=2", "did you mean 'model.num_layers'?"),
        ("train.steps=abc", "train.steps: expected an integer, got str 'abc'"),
        ("parallel.tp=1.5", "parallel.tp: expected an integer, got float 1.5"),
        ("model.tie_embeddings=1", "model.tie_embeddings: expected true or false"),
        ("stage=sfft", "stage: 'sfft' is not a stage; did you mean 'sft'? the stages that run are: sft, opd"),
        ("train.optim.lr", "is not of the form a.b.c=value"),
        ("train.steps.x=1", "train.steps is a value, not a section"),
        ("train.steps=[1,", "override 'train.steps=[1,': the value is not valid YAML"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  micro_batch: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.micro_batch'; did you mean 'train.micro_batch_size'"):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stage: sft\ntrain:\n  steps: 3\n   micro_batch_size: 4\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:\d+: invalid YAML: "):
        load_config(path)
    line = _one_line_error(_cli("train", str(path), cwd=tmp_path))
    assert line.startswith(f"error: {path}:4:")


# ---------------------------------------------------------------------------------------------
# The stage registry


def test_unknown_and_unimplemented_stages_are_refused_at_load(tmp_path, monkeypatch):
    # Every planned stage is implemented now (grm was the last): a planned one is put in the table.
    monkeypatch.setitem(STAGES, "planned", None)
    path = tmp_path / "c.yaml"
    path.write_text("stage: planned\n")
    runs = "sft, opd, grpo, grm, grm_sft, grm_rm"
    with pytest.raises(ConfigError, match=rf"^stage: 'planned' is not implemented yet; the stages that run are: {runs}$"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"stage: 'distil' is not a stage; the stages that run are: {runs}"):
        load_config(None, ["stage=distil"])
    with pytest.raises(ConfigError, match="is not implemented yet"):
        JobConfig(stage="planned")  # no path around the load-time refusal, derive() and ranks included
    # Before anything is built: the CLI answers in one line, fast, without torch.
    assert "is not a stage" in _one_line_error(_cli("train", str(TINY_SFT), "stage=distil", cwd=tmp_path))


def test_every_implemented_stage_resolves_to_its_class():
    import importlib

    from megatron_opd.config import stage_spec

    for name, spec in STAGES.items():
        if spec is None:
            continue
        module, _, cls = stage_spec(name).target.partition(":")
        stage = getattr(importlib.import_module(module), cls)
        assert stage.name == name


# ---------------------------------------------------------------------------------------------
# JobConfig.check: values, layout, stage keys


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=0", "train.steps must be >= 1, got 0"),
        ("train.steps=-3", "train.steps must be >= 1, got -3"),
        ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1, got 0"),
        ("train.global_batch_size=0", "train.global_batch_size must be >= 1, got 0"),
        ("data.eval_size=-1", "data.eval_size must be >= 0, got -1"),
        ("run.log_every=0", "run.log_every must be >= 1, got 0"),
        ("train.global_batch_size=100", "train.global_batch_size=100 is not divisible by dp * train.micro_batch_size = 1 * 64 = 64"),
        ("run.nproc=3", "world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2"),
    ],
)
def test_train_refuses_bad_values_in_one_line(tmp_path, override, message):
    line = _one_line_error(_cli("train", str(TINY_SFT), override, f"run.output_dir={tmp_path / 'runs'}", cwd=tmp_path))
    assert line == f"error: {message}" or message in line, line
    assert not (tmp_path / "runs").exists(), "a refused config wrote a run"


def _opd_job(tmp_path: Path, **teacher) -> Path:
    """A one-teacher OPD job against a server that is not there: a config error must come first."""
    tree = {
        "stage": "opd",
        "run": {"name": "opd", "output_dir": str(tmp_path / "runs"), "nproc": 1},
        "model": yaml.safe_load(TINY_OPD.read_text())["model"],
        "train": {"steps": 1, "micro_batch_size": 4, "global_batch_size": 4, "eval_every": 0},
        "data": {"domains": ["add"], "eval_size": 4},
        "teachers": {"t": {"endpoints": ["http://127.0.0.1:9"], "domains": ["add"], "signal": "sampled", **teacher}},
    }
    path = tmp_path / "opd.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.temperature=-0.5", "rollout.temperature must be a finite number >= 0 (0: greedy), got -0.5"),
        ("rollout.top_p=0", "rollout.top_p must be in (0, 1] (1: no nucleus cut), got 0.0"),
        ("rollout.top_p=1.5", "rollout.top_p must be in (0, 1] (1: no nucleus cut), got 1.5"),
        ("rollout.top_k=-1", "rollout.top_k must be >= 0 (0: no limit), got -1"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be >= 1, got 0"),
        ("rollout.engine=sglang", "rollout.engine=sglang needs rollout.endpoints"),
        ("data.domains=[add,sort]", "domain 'sort' (data.domains) has no teacher"),
        ("teachers.t.temperature=2.0", "teachers.t.temperature=2.0 needs the full distribution"),
        ("teachers.t.signal=hidden", "teachers.t.signal is 'hidden' but teachers.t.model_dir is empty"),
        ("teachers.t.endpoints=[]", "teachers.t.endpoints is empty; give at least one base URL"),
    ],
)
def test_opd_keys_are_refused_before_any_rank(tmp_path, override, message):
    line = _one_line_error(_cli("train", str(_opd_job(tmp_path)), override, cwd=tmp_path))
    assert message in line, line
    assert not (tmp_path / "runs").exists()


def test_every_problem_of_a_config_is_listed():
    cfg = load_config(TINY_SFT, ["train.steps=0", "parallel.tp=3", "data.eval_size=-2"])
    with pytest.raises(ConfigError) as e:
        cfg.check()
    message = str(e.value)
    assert message.startswith("4 problems in the config:\n  - "), message
    for part in ("world size 2 is not divisible by tp*pp*cp = 3", "model.num_attention_heads=4 is not divisible by parallel.tp=3",
                 "train.steps must be >= 1", "data.eval_size must be >= 0"):  # fmt: skip
        assert part in message


def test_fused_output_layer_needs_no_sequence_parallel():
    cfg = load_config(TINY_OPD, ["opd.fused_output_layer=true", "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="opd.fused_output_layer needs parallel.sequence_parallel=false"):
        cfg.check(by_pipeline=True)


def test_launcher_filled_keys_are_only_left_open_for_that_launcher():
    cfg = load_config(TINY_OPD)  # `megatron-opd run` trains the experts and starts their servers
    cfg.check(by_pipeline=True)
    with pytest.raises(ConfigError, match="teachers.arithmetic.endpoints is empty"):
        cfg.check()
    with pytest.raises(ConfigError, match="teachers.arithmetic.signal is 'hidden' but teachers.arithmetic.model_dir is empty"):
        cfg.check(endpoints_from_launcher=True)  # submit: the servers, but not the model dirs
    bad = derive(cfg, ["pipeline.expert_overrides_by_teacher={arith: [train.steps=5]}"])
    with pytest.raises(ConfigError, match=r"pipeline.expert_overrides_by_teacher names \['arith'\], which are not teachers"):
        bad.check(by_pipeline=True)


def test_layout_not_dividing_world_names_numbers():
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by tp\*pp\*cp = 4\*1\*1 = 4"):
        ParallelLayout(tp=4).resolve(6)
    with pytest.raises(LayoutError, match=r"parallel.dp=3 but world size 8 / \(tp\*pp\*cp = 2\) = 4"):
        ParallelLayout(tp=2, dp=3).resolve(8)
    with pytest.raises(LayoutError, match=r"parallel.ep=4 does not divide the data\*context parallel size dp\*cp = 2\*1 = 2"):
        ParallelLayout(tp=2, ep=4).resolve(4)
    assert ParallelLayout(tp=2, pp=2).resolve(8).dp == 2


def test_layout_checks_the_model():
    model = ModelConfig(num_attention_heads=6, num_query_groups=3, num_layers=4)
    with pytest.raises(LayoutError, match="model.num_attention_heads=6 is not divisible by parallel.tp=4"):
        model.check(ParallelLayout(tp=4, dp=1))
    with pytest.raises(LayoutError, match="model.num_layers=4 is not divisible by parallel.pp=3"):
        model.check(ParallelLayout(pp=3, dp=1))
    moe = ModelConfig(num_experts=6)
    with pytest.raises(LayoutError, match="model.num_experts=6 is not divisible by parallel.ep=4"):
        moe.check(ParallelLayout(ep=4, dp=4))
    with pytest.raises(LayoutError, match="need parallel.sequence_parallel=true"):
        moe.check(ParallelLayout(tp=2, dp=1))
    with pytest.raises(LayoutError, match="parallel.ep=2 needs a MoE model"):
        ModelConfig().check(ParallelLayout(ep=2, dp=2))
    with pytest.raises(ValueError, match="model.num_layers must be >= 1, got 0"):
        ModelConfig(num_layers=0).check(ParallelLayout())


# Each shipped config, checked the way the command that runs it checks it.
SHIPPED = {
    "tiny/sft.yaml": "train",
    "tiny/opd.yaml": "run",
    "tiny/recipe.yaml": "run",
    "tiny/grpo.yaml": "train",
    "tiny/grm_sft.yaml": "train",
    "tiny/grm.yaml": "run",  # the GRM report: each phase's derived job is checked
    "cluster/opd-4node.yaml": "submit",
    "cluster/tiny-sft-one-node.yaml": "submit",
    "cluster/grpo-3node.yaml": "submit",
    "cluster/qwen3-8b-opd-math-code.yaml": "submit",
    "cluster/qwen3-8b-grpo-math.yaml": "submit",
}


def test_every_shipped_config_is_listed():
    found = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
    assert found == sorted(SHIPPED), "add the new config to SHIPPED with the command that runs it"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_passes_its_check(name, tmp_path):
    """A cluster config is checked on a cluster file system (tests/cluster_fs_fixtures.py: the
    files it names exist, HF model directories with their published config.json); one that uses
    what this checkout lacks yet (a stage, data.datasets) is skipped with that reason."""
    from cluster_fs_fixtures import missing_features, on_cluster_fs

    path = REPO / "configs" / name
    if reason := missing_features(path):
        pytest.skip(reason)
    if SHIPPED[name] == "submit":
        path = on_cluster_fs(path, tmp_path / "fs")
    cfg = load_config(path)
    command = SHIPPED[name]
    if command == "train":
        from megatron_opd.stages.launch import job_tokenizer

        cfg.check()
        job_tokenizer(cfg)
    elif command == "run" and cfg.stage == "grm":
        from launchers.grm import check_plans

        assert check_plans(cfg)  # every seed's phases, each checked as `megatron-opd train` would
    elif command == "run":
        cfg.check(by_pipeline=True)
    else:
        from launchers.slurm import prepare

        prepare(path, workdir=tmp_path)  # JobConfig.problems on the trainer's world, then the cluster's


def test_a_shipped_model_section_that_does_not_describe_its_checkpoint_fails(tmp_path):
    """What the cluster file system makes possible: the check reads the published config.json of
    train.init_from and names the key that differs."""
    from cluster_fs_fixtures import missing_features, on_cluster_fs
    from launchers.slurm import prepare

    path = REPO / "configs/cluster/qwen3-8b-opd-math-code.yaml"
    if reason := missing_features(path):
        pytest.skip(reason)
    with pytest.raises(ConfigError, match=r"model.num_layers=28 but config.json gives 36"):
        prepare(on_cluster_fs(path, tmp_path / "fs"), ["model.num_layers=28"], workdir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Before any rank: under torchrun, and `run`


def test_train_under_torchrun_env_checks_against_its_world(tmp_path):
    """With RANK/WORLD_SIZE set (one rank of a torchrun world), the check uses that world and
    refuses before the process group is joined (which would wait for the other ranks)."""
    from megatron_opd.runtime.spawn import free_port

    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    out = _cli("train", str(TINY_SFT), f"run.output_dir={tmp_path / 'runs'}", cwd=tmp_path, env=env, timeout=120)
    assert "world size 3 is not divisible by tp*pp*cp = 2*1*1 = 2" in _one_line_error(out)
    assert not (tmp_path / "runs").exists()


def test_run_checks_the_whole_job_before_training_experts(tmp_path):
    out = _cli("run", str(TINY_OPD), "rollout.top_p=2", f"run.output_dir={tmp_path / 'runs'}", cwd=tmp_path, timeout=120)
    assert "rollout.top_p must be in (0, 1]" in _one_line_error(out)
    assert not (tmp_path / "runs").exists(), "experts were trained for a config that fails its check"


# ---------------------------------------------------------------------------------------------
# No torch, megatron or numpy


BLOCKER = '''
import sys

class _Absent:
    """Imports of these fail as if they were not installed (a SLURM login node)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "megatron", "numpy"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _Absent())
'''


@pytest.fixture
def blocked_path(tmp_path) -> str:
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    return os.pathsep.join([str(site), str(REPO)])


def _torch_free(python, pythonpath: str, cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    probe = subprocess.run([str(python), "-c", "import torch"], env=env, cwd=cwd, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, "torch is importable: the test proves nothing"
    imported = subprocess.run([str(python), "-c", "import megatron_opd.config"], env=env, cwd=cwd, capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    out = _cli("submit", str(REPO / "configs/cluster/opd-4node.yaml"), "--dry-run", cwd=cwd, pythonpath=pythonpath, python=python)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("#!/bin/bash") and "megatron_opd.cli train" in out.stdout
    # A config error there is one line too (the job's check runs on the login node).
    out = _cli("submit", str(REPO / "configs/cluster/opd-4node.yaml"), "parallel.tp=3", "--dry-run", cwd=cwd, pythonpath=pythonpath, python=python)
    assert "world size 16 is not divisible by tp*pp*cp = 3" in out.stderr and out.returncode == 2, out.stderr[-3000:]


def test_config_and_submit_without_torch(blocked_path, tmp_path):
    _torch_free(sys.executable, blocked_path, tmp_path)


def test_config_and_submit_in_a_venv_without_torch(tmp_path):
    """A real interpreter where torch, megatron and numpy are not installed: a fresh venv that
    sees only PyYAML (copied from this environment, so no network is needed) and the repo."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    only_yaml = tmp_path / "site"
    shutil.copytree(Path(yaml.__file__).parent, only_yaml / "yaml")
    _torch_free(python, os.pathsep.join([str(only_yaml), str(REPO)]), tmp_path)


@pytest.mark.parametrize(
    "module",
    ["megatron_opd.config", "megatron_opd.teachers.config", "megatron_opd.rollout.config", "megatron_opd.models.config",
     "megatron_opd.runtime.cluster", "megatron_opd.runtime.layout", "launchers.slurm"],
)  # fmt: skip
def test_each_config_module_imports_first_and_torch_free(module, blocked_path, tmp_path):
    """No import cycle between the tree and its sections, whichever is imported first."""
    env = dict(os.environ, PYTHONPATH=blocked_path)
    out = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------------------------------------
# API keys


@pytest.mark.parametrize("where", ["teachers.t", "rollout"])
def test_literal_api_key_is_refused_without_echoing_it(tmp_path, where):
    tree: dict = {"teachers": {"t": {"domains": ["add"]}}} if where == "teachers.t" else {}
    node = tree
    for part in where.split("."):
        node = node.setdefault(part, {})
    node["api_key"] = "sk-do-not-print-me"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert f"{where}.api_key is not accepted" in message
    assert f"{where}.api_key_env=NAME" in message and f"{where}.api_key_file=PATH" in message
    assert "sk-do-not-print-me" not in message
    with pytest.raises(ConfigError, match=rf"{where}.api_key is not accepted"):
        load_config(None, [f"{where}.api_key=sk-do-not-print-me"])


def test_api_key_is_read_when_used_from_env_or_file(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_TEST_KEY", "k-env")
    (tmp_path / "key").write_text("k-file\n")
    assert TeacherConfig(api_key_env="OPD_TEST_KEY").api_key == "k-env"
    assert TeacherConfig(api_key_file=str(tmp_path / "key")).api_key == "k-file"
    assert TeacherConfig().api_key == ""
    monkeypatch.setenv("OPD_TEST_KEY", "k-rotated")  # read at use time, not at load time
    assert TeacherConfig(api_key_env="OPD_TEST_KEY").api_key == "k-rotated"
    with pytest.raises(SecretError, match=r"api_key_env=OPD_UNSET_KEY but \$OPD_UNSET_KEY is not set"):
        TeacherConfig(api_key_env="OPD_UNSET_KEY").api_key
    with pytest.raises(SecretError, match="api_key_file=.*missing cannot be read"):
        TeacherConfig(api_key_file=str(tmp_path / "missing")).api_key
    cfg = load_config(None, ["stage=opd", "teachers.t.api_key_env=A", "teachers.t.api_key_file=/k", "teachers.t.domains=[add]"])
    with pytest.raises(ConfigError, match="teachers.t.api_key_env and teachers.t.api_key_file are both set; keep one"):
        cfg.check(by_pipeline=True)


def test_a_run_with_a_keyed_teacher_writes_no_key(tmp_path):
    """An OPD run against a teacher server that requires a key: the run authenticates (it trains)
    and no file it writes holds the key."""
    import urllib.error
    import urllib.request

    from megatron_opd.data.tokenizer import CharTokenizer
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.serving.launch import start_teacher_server

    key = "k3y-that-must-never-be-written-0451"
    model = load_config(TINY_OPD).model
    teacher_dir = write_model_dir(tmp_path / "teacher", model, CharTokenizer()).path
    server = start_teacher_server(model_dir=teacher_dir, random_init=True, api_key=key, log_path=tmp_path / "server.log")
    try:
        request = urllib.request.Request(f"{server.url}/generate", data=b"{}", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401  # the server really wants the key
        assert key not in " ".join(map(str, server.process.args)), "the key is on the server's command line (ps shows it)"
        job = _opd_job(tmp_path, endpoints=[server.url], api_key_env="OPD_TEST_TEACHER_KEY")
        env = dict(os.environ, OPD_TEST_TEACHER_KEY=key)
        out = _cli("train", str(job), "run.progress=none", "train.eval_at_start=false", cwd=tmp_path, env=env, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finally:
        server.stop()
    run_dir = tmp_path / "runs" / "opd"
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert (run_dir / "config.yaml") in written and (run_dir / "metrics.jsonl") in written
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["teachers"]["t"]["api_key_env"] == "OPD_TEST_TEACHER_KEY"
    for path in written + [job]:
        assert key.encode() not in path.read_bytes(), f"{path} holds the API key"
    assert key not in out.stdout + out.stderr


def test_dumped_config_round_trips_without_keys(tmp_path):
    cfg = load_config(None, ["stage=opd", "teachers.t.api_key_env=OPD_KEY", "teachers.t.domains=[add]", "rollout.api_key_file=/run/key"])
    dump_config(cfg, tmp_path / "c.yaml")
    text = (tmp_path / "c.yaml").read_text()
    assert "api_key:" not in text and "api_key_env: OPD_KEY" in text and "api_key_file: /run/key" in text
    assert load_config(tmp_path / "c.yaml") == cfg


def test_mla_refuses_query_groups_and_moe_layers_follow_the_layer_pattern():
    from megatron_opd.models.config import ModelConfig
    from megatron_opd.runtime.layout import ParallelLayout

    mla = dict(multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8, v_head_dim=8)
    ModelConfig(**mla).check(ParallelLayout())
    with pytest.raises(ValueError, match=r"model.multi_latent_attention does not take model.num_query_groups=2 .* set model.num_query_groups=0"):
        ModelConfig(num_query_groups=2, **mla).check(ParallelLayout())
    assert ModelConfig(num_layers=3, num_experts=4, moe_layer_freq=[1, 0, 1]).moe_layers == [0, 2]
    assert ModelConfig(num_layers=2, num_experts=4).moe_layers == [0, 1] and ModelConfig().moe_layers == []
