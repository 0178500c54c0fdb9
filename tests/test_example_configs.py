"""Every config under configs/ loads and passes the checks of the command that runs it (issue 15, item 6).

- configs/tiny/*: `megatron-opd run` for an OPD job (its pipeline trains the experts), else
  `megatron-opd train`: `JobConfig.check` on `run.nproc` ranks.
- configs/cluster/*: `megatron-opd submit` (launchers/slurm.py): the job's checks on the
  trainer's world, with the servers the launcher starts, and the cluster's (roles, nodes, GPUs,
  memory, time). tests/test_slurm_render.py renders their scripts.

A cluster config names paths on the cluster's file system (/lustre/...), which a login node sees
and this machine does not. The test gives it one (tests/cluster_fs_fixtures.py): /lustre is
mapped into a temporary directory, where every prompt file the config names exists (one row),
and every Hugging Face model directory it names holds the config.json of the model it is
(REAL_CONFIG_JSON, the published file; a directory not listed there stays unseen, as from a login
node that does not mount it). So the checks that read files run for real: a `model:` section
that does not describe its train.init_from's config.json, or a missing dataset, fails here.

A config that uses what this checkout does not have yet (`missing_features`: a stage not
registered, data.datasets before the prompt-file sources) is skipped with that reason, and
checked as soon as the feature is there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_fs_fixtures import missing_features, on_cluster_fs

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads_and_passes_its_checks(config, tmp_path):
    from megatron_opd.config import load_config

    if reason := missing_features(config):
        pytest.skip(reason)
    if config.parent.name == "cluster":
        from launchers.slurm import check, load_job, plan

        job, cluster = load_job(on_cluster_fs(config, tmp_path))
        check(plan(job, cluster, workdir="/scratch/work"))  # raises with every problem
    else:
        cfg = load_config(config)
        cfg.check(cfg.run.nproc, by_pipeline=cfg.stage == "opd")


def test_a_model_section_that_does_not_describe_its_checkpoint_fails(tmp_path):
    """The check the cluster file system makes possible: it reads config.json and can fail."""
    from launchers.slurm import check, load_job, plan
    from megatron_opd.config import ConfigError

    config = REPO / "configs/cluster/qwen3-8b-opd-math-code.yaml"
    if reason := missing_features(config):
        pytest.skip(reason)
    job, cluster = load_job(on_cluster_fs(config, tmp_path), ["model.num_layers=28"])
    with pytest.raises(ConfigError, match=r"model.num_layers=28 but config.json gives 36"):
        check(plan(job, cluster, workdir="/scratch/work"))
