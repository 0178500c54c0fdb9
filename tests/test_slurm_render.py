"""Rendering and checking SLURM jobs without a cluster: the sbatch text, and errors before submission.

A many-node cluster cannot run here, so the 4-node and heterogeneous scripts are checked as
text (srun lines, node lists, flags) and with `bash -n`; the errors are checked by submitting
with a fake `sbatch` that records its calls, which must stay empty.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from megatron_opd.config import ConfigError
from megatron_opd.runtime.cluster import ClusterConfig
from launchers.slurm import RUNTIME_SH, ClusterConfigError, check, load_job, plan, prepare, render, submit

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs/cluster/opd-4node.yaml"


def _render(config=EXAMPLE, overrides=()):
    job, cluster = load_job(config, list(overrides))
    p = plan(job, cluster, workdir="/scratch/work")
    check(p)
    return p, render(p)


def _srun_blocks(script: str) -> dict[str, str]:
    """The srun command of each role, keyed by its log name (from --output)."""
    blocks = {}
    for block in re.split(r"\n(?=supervise |srun )", script):
        match = re.search(r'--output="\$LOGS/([\w-]+)-%N\.log"', block)
        if match and "srun" in block:
            blocks[match.group(1)] = block.split(" &\n")[0]
    return blocks


SHELLCHECK = shutil.which("shellcheck")


def _shell_ok(path: Path, *shellcheck_args: str) -> None:
    """`bash -n`, and shellcheck where it is installed (every severity, style included)."""
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if SHELLCHECK:
        result = subprocess.run([SHELLCHECK, *shellcheck_args, str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    # SC2317 ("unreachable"): the runtime's functions run from traps, and a job without servers
    # never calls wait_healthy.
    _shell_ok(path, "--exclude=SC2317")


def test_runtime_is_a_checked_shell_file_inlined_into_the_script(tmp_path):
    runtime = REPO / "launchers" / RUNTIME_SH
    _shell_ok(runtime)
    _, script = _render()
    assert runtime.read_text().rstrip("\n") in script  # inlined verbatim: compute nodes need no source tree
    # Inlined after `set -uo pipefail` and before the environment that its functions read.
    assert script.index("set -uo pipefail") < script.index("supervise() {") < script.index("HEALTH_TIMEOUT=")


def test_built_package_carries_the_runtime(tmp_path):
    """An installed package renders scripts too: the .sh is package data of the wheel."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("megatron_opd", "launchers", "checkpoints_tools"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "wheel"), str(src)], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert f"launchers/{RUNTIME_SH}" in z.namelist()
        assert z.read(f"launchers/{RUNTIME_SH}") == (REPO / "launchers" / RUNTIME_SH).read_bytes()


def test_four_node_dry_run_trainer_and_two_teachers(tmp_path):
    p, script = _render()
    _bash_syntax_ok(script, tmp_path)
    assert p.total_nodes == 4
    # One allocation of 4 GPU nodes, the warning signal and requeue, logs next to the run.
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=batch",
                 "#SBATCH --account=my-account", "#SBATCH --time=04:00:00", "#SBATCH --signal=B:USR1@900",
                 "#SBATCH --requeue", "#SBATCH --exclusive", "#SBATCH --chdir=/scratch/work",
                 "#SBATCH --output=/lustre/runs/opd-4node/slurm/job-%j.log"):  # fmt: skip
        assert line in script, line
    # Node groups: trainer on nodes 0-1, code on node 2, math on node 3 (teachers sorted by name).
    assert 'TRAINER_NODES=$(slice_hosts "$SLURM_JOB_NODELIST" 0 2)' in script
    assert 'TEACHER_CODE_0_NODES=$(slice_hosts "$SLURM_JOB_NODELIST" 2 1)' in script
    assert 'TEACHER_MATH_0_NODES=$(slice_hosts "$SLURM_JOB_NODELIST" 3 1)' in script

    blocks = _srun_blocks(script)
    assert sorted(blocks) == ["router-code", "router-math", "teacher-code-0", "teacher-math-0", "trainer"]
    trainer = blocks["trainer"]
    for flag in ('--nodelist="$TRAINER_NODES"', "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                 "--gpus-per-node=8", "--mem=1500G", "--kill-on-bad-exit=1",
                 "--container-image=/lustre/images/megatron-opd.sqsh", "--container-mounts=/lustre:/lustre",
                 "python -m torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                 '"--rdzv-endpoint=${TRAINER_NODES%%,*}:29500"', '"--rdzv-id=$SLURM_JOB_ID"',
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=600",
                 '-m megatron_opd.cli train "$JOB_CONFIG"'):  # fmt: skip
        assert flag in trainer, flag
    # The trainer reaches each teacher through that teacher's router.
    assert '"teachers.code.endpoints=[http://${ROUTER_CODE_NODES%%,*}:30001]"' in trainer
    assert '"teachers.math.endpoints=[http://${ROUTER_MATH_NODES%%,*}:30003]"' in trainer
    # The trainer gets the key's variable name, not its value: no key in its argv or its config.yaml.
    assert "teachers.math.api_key_env=OPD_TEACHER_KEY" in trainer and "$OPD_TEACHER_KEY" not in trainer

    math, code = blocks["teacher-math-0"], blocks["teacher-code-0"]
    for server, port, ep in ((math, 30002, 1), (code, 30000, 8)):
        for flag in ("python -m sglang.launch_server", "--tp-size 8", f"--ep-size {ep}", "--skip-tokenizer-init",
                     "--mem-fraction-static 0.85", "--context-length 8192", "--host 0.0.0.0", f"--port {port}",
                     '--api-key "$OPD_TEACHER_KEY"', "--nodes=1", "--gpus-per-node=8"):  # fmt: skip
            assert flag in server, (flag, server)
    assert "--model-path /lustre/models/math-expert-hf" in math
    # Hidden states (math) need every position computed: no radix cache, no chunked prefill.
    for flag in ("--enable-return-hidden-states", "--disable-radix-cache", "--chunked-prefill-size -1"):
        assert flag in math and flag not in code, flag

    router = blocks["router-math"]
    assert "python -m sglang_router.launch_router" in router
    assert '--worker-urls "http://${TEACHER_MATH_0_NODES%%,*}:30002"' in router
    assert "--policy cache_aware" in router and "--port 30003" in router and "--overlap" in router
    # Every server's /health, then every router, before the trainer starts.
    order = [script.index(s) for s in ("wait_healthy /health", "wait_healthy /get_model_info", "srun \\\n    --nodelist=\"$TRAINER_NODES\"")]
    assert order == sorted(order)
    assert '"http://${TEACHER_CODE_0_NODES%%,*}:30000" "http://${TEACHER_MATH_0_NODES%%,*}:30002"' in script
    # The API key is never written into the script, only its variable's name.
    assert ": \"${OPD_TEACHER_KEY:?" in script


def test_hetjob_layout_one_group_per_role(tmp_path):
    p, script = _render(overrides=["cluster.layout=hetjob", "cluster.teachers.math.replicas=2", "cluster.nodes=5"])
    _bash_syntax_ok(script, tmp_path)
    assert script.count("#SBATCH hetjob") == 2
    groups = re.findall(r"# het group (\d): (\S+)", script)
    assert groups == [("0", "trainer"), ("1", "teacher-code"), ("2", "teacher-math")]
    # The teacher-math group holds both replicas: 2 nodes.
    third = script.split("# het group 2: teacher-math")[1].split("\n\n")[0]
    assert "#SBATCH --nodes=2" in third
    assert "#SBATCH --mem=1538048M" in third  # 1500G for the server + 2G for its router
    assert 'TEACHER_MATH_1_NODES=$(slice_hosts "$SLURM_JOB_NODELIST_HET_GROUP_2" 1 1)' in script
    blocks = _srun_blocks(script)
    assert "--het-group=0" in blocks["trainer"]
    assert "--het-group=2" in blocks["teacher-math-1"] and "--port 30003" in blocks["teacher-math-1"]
    assert '--worker-urls "http://${TEACHER_MATH_0_NODES%%,*}:30002" "http://${TEACHER_MATH_1_NODES%%,*}:30003"' in blocks["router-math"]


def test_multi_node_replica_gets_node_rank_inside_the_task(tmp_path):
    p, script = _render(overrides=["cluster.teachers.math.nodes_per_replica=2", "cluster.teachers.math.tp=16",
                                   "cluster.nodes=5"])  # fmt: skip
    _bash_syntax_ok(script, tmp_path)
    math = _srun_blocks(script)["teacher-math-0"]
    assert "--nodes=2" in math and "--ntasks=2" in math
    # $SLURM_NODEID is escaped so that each task's shell expands its own; the batch script
    # expands the head host into --dist-init-addr.
    assert "bash -c \"exec 'python' '-m' 'sglang.launch_server'" in math
    assert "'--nnodes' '2' '--node-rank' \\$SLURM_NODEID '--dist-init-addr' '${TEACHER_MATH_0_NODES%%,*}:31002'" in math


def test_ft_launcher_trainer_flags():
    _, script = _render(overrides=["cluster.trainer.launcher=ft_launcher", "cluster.trainer.max_restarts=3",
                                   "cluster.trainer.heartbeat_timeout_s=300"])  # fmt: skip
    trainer = _srun_blocks(script)["trainer"]
    assert "python -m nvidia_resiliency_ext.fault_tolerance.launcher" in trainer
    for flag in ("--max-restarts=3", "--ft-rank-heartbeat-timeout=300", "--ft-initial-rank-heartbeat-timeout=1800",
                 "--term-timeout=600", "env TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"):  # fmt: skip
        assert flag in trainer, flag


def test_requeue_flow_in_script():
    _, script = _render()
    # USR1/TERM to the batch shell reach the trainer step as USR1; its rank 0 writes the stop marker.
    assert "trap 'on_stop USR1' USR1" in script and "trap 'on_stop TERM' TERM" in script
    assert 'kill -USR1 "$TRAINER_PID"' in script
    assert 'export OPD_STOP_MARKER="$LOGS/stopped"' in script
    assert 'if [[ -f $OPD_STOP_MARKER ]]; then' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script


# ---------------------------------------------------------------------------------------------
# Errors before submission: nothing is submitted


@pytest.fixture
def fake_sbatch(tmp_path):
    """An sbatch that records its arguments and answers a job id."""
    calls = tmp_path / "sbatch-calls"
    exe = tmp_path / "sbatch"
    exe.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 4242\n')
    exe.chmod(0o755)
    return exe, calls


def _write(tmp_path: Path, overrides: dict) -> Path:
    tree = yaml.safe_load(EXAMPLE.read_text())
    for dotted, value in overrides.items():
        node = tree
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    tree["run"]["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"cluster.nodes": 3}, r"cluster\.nodes=3 does not match the roles: trainer 2 \+ teachers\.code 1x1 \+ teachers\.math 1x1 nodes.*: 4"),
        ({"parallel.tp": 3}, r"world size 16 is not divisible by tp\*pp\*cp = 3\*1\*1 = 3"),
        ({"train.global_batch_size": 100}, r"train\.global_batch_size=100 is not divisible by dp \* train\.micro_batch_size = 2 \* 4"),
        ({"teachers.code.signal": "logits", "teachers.code.topk": None}, r"teachers\.code\.signal is 'logits', which only our embedded server sends"),
        ({"cluster.trainer.procs_per_node": 16}, r"procs_per_node=16 exceeds cluster\.gpus_per_node=8"),
        ({"cluster.teachers.code": None}, r"teacher 'code' has no servers: add cluster\.teachers\.code"),
        ({"cluster.teachers.mathh": {"model_path": "/m"}}, r"cluster\.teachers\.mathh .* did you mean 'math'\?"),
        ({"cluster.teachers.math.tp": 16}, r"tp\*dp = 16\*1 = 16 GPUs per replica, but a replica has 1 node\(s\) x 8 GPUs"),
        ({"cluster.teachers.code.ep": 3}, r"ep=3 must divide tp=8"),
        ({"cluster.teachers.math.replicas": 0}, r"teacher 'math' needs at least one server"),
        ({"cluster.gpus_per_node": 0, "cluster.trainer.procs_per_node": 8}, r"SGLang servers need GPUs"),
        ({"cluster.signal_seconds": 300}, r"stop_timeout_s=600 lets the ranks save for longer than the warning"),
        ({"cluster.layout": "colocated", "cluster.nodes": 2, "cluster.trainer.mem": None}, r"cluster\.trainer\.mem is empty: with layout colocated"),
        ({"teachers.math.model_dir": None}, r"teachers\.math\.signal is 'hidden' but teachers\.math\.model_dir is empty"),
    ],
)
def test_config_errors_before_submission(tmp_path, fake_sbatch, changes, message):
    exe, calls = fake_sbatch
    path = _write(tmp_path, changes)
    with pytest.raises(ClusterConfigError, match=message) as info:
        prepare(path, workdir=tmp_path)
    assert "nothing was submitted" in str(info.value)
    # submit() checks again: an unchecked plan never reaches sbatch.
    unchecked = plan(*load_job(path), workdir=tmp_path)
    with pytest.raises(ClusterConfigError, match=message):
        submit(unchecked, sbatch=str(exe))
    assert not calls.exists(), "sbatch was called for a config that failed its checks"
    assert not (tmp_path / "runs").exists(), "files were written for a config that failed its checks"


def test_every_problem_is_listed_at_once(tmp_path):
    path = _write(tmp_path, {"cluster.nodes": 9, "parallel.tp": 3, "cluster.teachers.code": None})
    with pytest.raises(ClusterConfigError) as info:
        prepare(path)
    # The job's own checks (world and model against the layout) and the cluster's, each once.
    message = str(info.value)
    assert message.startswith("4 problem(s)"), message
    for part in ("world size 16 is not divisible by tp*pp*cp = 3", "model.num_attention_heads=32 is not divisible by parallel.tp=3",
                 "cluster.nodes=9 does not match the roles", "teacher 'code' has no servers"):  # fmt: skip
        assert message.count(part) == 1, (part, message)


def test_unimplemented_stage_is_refused_at_load(tmp_path, fake_sbatch, monkeypatch, capsys):
    # Every planned stage runs now: a planned one is put in the registry (in this process, so the
    # CLI is called in-process too).
    from megatron_opd import cli
    from megatron_opd.config.stages import STAGES

    monkeypatch.setitem(STAGES, "planned", None)
    runs = ", ".join(name for name, spec in STAGES.items() if spec is not None)
    exe, calls = fake_sbatch
    path = _write(tmp_path, {"stage": "planned"})
    message = f"stage: 'planned' is not implemented yet; the stages that run are: {runs}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_job(path)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["submit", str(path), "--sbatch", str(exe)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not calls.exists()


def test_cli_refuses_bad_config_without_calling_sbatch(tmp_path, fake_sbatch):
    exe, calls = fake_sbatch
    path = _write(tmp_path, {"cluster.nodes": 3})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "launchers.slurm", str(path), "--sbatch", str(exe)],
                            capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "cluster.nodes=3 does not match the roles" in result.stderr
    assert not calls.exists()


def test_submit_writes_script_and_snapshot_then_calls_sbatch(tmp_path, fake_sbatch):
    exe, calls = fake_sbatch
    path = _write(tmp_path, {})
    sub = submit(prepare(path, ["train.steps=7", "cluster.partition=gpu"], workdir=tmp_path), sbatch=str(exe))
    assert sub.job_id == "4242"
    assert calls.read_text().split() == ["--parsable", str(sub.script)]
    assert "#SBATCH --partition=gpu" in sub.script.read_text()
    snapshot = yaml.safe_load(sub.snapshot.read_text())
    assert snapshot["train"]["steps"] == 7 and snapshot["cluster"]["partition"] == "gpu"
    # The trainer reads exactly this snapshot.
    assert f"JOB_CONFIG={sub.snapshot}" in sub.script.read_text()


def test_dry_run_prints_and_writes_nothing(tmp_path, fake_sbatch):
    exe, calls = fake_sbatch
    path = _write(tmp_path, {})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "launchers.slurm", str(path), "--dry-run", "--sbatch", str(exe)],
                            capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/bash") and "srun" in result.stdout
    assert not calls.exists() and not (tmp_path / "runs").exists()


def test_cluster_keys_are_checked(tmp_path):
    path = _write(tmp_path, {})
    with pytest.raises(ConfigError, match=r"unknown config key 'cluster.trainer.node'; did you mean 'cluster.trainer.nodes'\?"):
        load_job(path, ["cluster.trainer.node=3"])
    with pytest.raises(ConfigError, match=r"cluster.layout: 'splitt' is not one of"):
        load_job(path, ["cluster.layout=splitt"])


def test_cluster_config_is_light():
    """The config tree may import ClusterConfig: it must not pull in torch."""
    code = "import sys, megatron_opd.runtime.cluster; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert ClusterConfig().layout == "split"


@pytest.mark.parametrize("example", sorted((REPO / "configs/cluster").glob("*.yaml")), ids=lambda p: p.name)
def test_example_cluster_configs_pass_their_checks(example, tmp_path):
    from cluster_fs_fixtures import missing_features, on_cluster_fs

    if reason := missing_features(example):
        pytest.skip(reason)
    p, script = _render(on_cluster_fs(example, tmp_path))  # the files it names exist, as on the cluster
    _bash_syntax_ok(script, tmp_path)
    assert "srun" in script and "megatron_opd.cli train" in script
