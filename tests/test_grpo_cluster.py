"""A GRPO job on a cluster (`megatron-opd submit`, launchers/slurm.py): its rendered batch script.

configs/cluster/grpo-3node.yaml: the trainer on node 0, the SGLang rollout pool (two servers,
one node each, behind the sglang-router) beside it; the servers are started and waited on before
the trainer, which gets the router's URL as rollout.endpoints and the key's variable name. The
job's GRPO checks run before anything is written (a group of one is refused at submission). The
same job on a real slurmctld is tests/test_slurm_jobs.py::test_grpo_job_with_its_rollout_pool.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launchers.slurm import ClusterConfigError, check, load_job, plan, render

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/cluster/grpo-3node.yaml"


def _render(overrides=()):
    job, cluster = load_job(CONFIG, list(overrides))
    p = plan(job, cluster, workdir="/scratch/work")
    check(p)
    return p, render(p)


def _srun_blocks(script: str) -> dict[str, str]:
    blocks = {}
    for block in re.split(r"\n(?=supervise |srun )", script):
        match = re.search(r'--output="\$LOGS/([\w-]+)-%N\.log"', block)
        if match and "srun" in block:
            blocks[match.group(1)] = block.split(" &\n")[0]
    return blocks


def test_grpo_dry_run_renders_the_rollout_pool_beside_the_trainer(tmp_path):
    p, script = _render()
    (tmp_path / "job.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sh")], capture_output=True).returncode == 0
    assert p.job.stage == "grpo" and p.total_nodes == 3 and "#SBATCH --nodes=3" in script
    assert 'TRAINER_NODES=$(slice_hosts "$SLURM_JOB_NODELIST" 0 1)' in script
    assert 'ROLLOUT_0_NODES=$(slice_hosts "$SLURM_JOB_NODELIST" 1 1)' in script
    assert 'ROLLOUT_1_NODES=$(slice_hosts "$SLURM_JOB_NODELIST" 2 1)' in script
    blocks = _srun_blocks(script)
    assert sorted(blocks) == ["rollout-0", "rollout-1", "router-rollout", "trainer"]
    for name, port in (("rollout-0", 30000), ("rollout-1", 30001)):
        server = blocks[name]
        for flag in ("python -m sglang.launch_server", "--model-path /lustre/models/math-expert-sft-hf", "--tp-size 8",
                     "--skip-tokenizer-init", f"--port {port}", '--api-key "$OPD_ROLLOUT_KEY"', "--gpus-per-node=8"):  # fmt: skip
            assert flag in server, (name, flag)
        assert "--enable-return-hidden-states" not in server  # a rollout server sends no hidden states
    router = blocks["router-rollout"]
    assert '--worker-urls "http://${ROLLOUT_0_NODES%%,*}:30000" "http://${ROLLOUT_1_NODES%%,*}:30001"' in router
    trainer = blocks["trainer"]
    assert '-m megatron_opd.cli train "$JOB_CONFIG"' in trainer
    assert '"rollout.endpoints=[http://${ROUTER_ROLLOUT_NODES%%,*}:30002]"' in trainer
    assert "rollout.api_key_env=OPD_ROLLOUT_KEY" in trainer and "$OPD_ROLLOUT_KEY" not in trainer
    assert "teachers." not in trainer  # GRPO has no teacher pool
    # The servers and the router answer before the trainer starts.
    order = [script.index(s) for s in ("wait_healthy /health", "wait_healthy /get_model_info", 'srun \\\n    --nodelist="$TRAINER_NODES"')]
    assert order == sorted(order)


def test_grpo_job_errors_before_submission():
    with pytest.raises(ClusterConfigError, match=r"grpo.group_size=1: GRPO compares the samples of one prompt"):
        _render(["grpo.group_size=1"])
    with pytest.raises(ClusterConfigError, match=r"cluster.rollout starts 2 rollout servers but rollout.engine is 'embedded'"):
        _render(["rollout.engine=embedded"])
    with pytest.raises(ClusterConfigError, match=r"grpo.kl_coef=0.1 > 0 needs reference weights"):
        _render(["grpo.kl_coef=0.1", "train.init_from="])
    # The CLI: one error, nothing submitted.
    result = subprocess.run([sys.executable, "-m", "megatron_opd.cli", "submit", str(CONFIG), "grpo.group_size=1", "--dry-run"],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert result.returncode == 2 and "grpo.group_size=1" in result.stderr and "#!/bin/bash" not in result.stdout
