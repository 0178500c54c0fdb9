"""Render and submit a megatron-opd job as one SLURM batch script (`python -m launchers.slurm`).

    python -m launchers.slurm CONFIG [key=value ...] [--dry-run]

CONFIG is a job YAML with a `cluster:` section (`megatron_opd.runtime.cluster.ClusterConfig`).
`check` runs the job's own `JobConfig.problems()` on the trainer's world (layout, batch,
teachers, stage keys) and then the cluster's (node counts, ranks against GPUs, every teacher has
servers, ...) before anything is written or submitted; `render` turns it into a readable bash
script with one section per role, the shell functions inlined from launchers/slurm_runtime.sh;
`submit` writes the script and a snapshot of the job config next to the logs and calls
`sbatch --parsable`. `--dry-run` prints the script. Torch-free: it runs on a login node.

What the rendered script does, in order (docs/launching.md has the full walk-through):
  1. node groups: which hosts each role owns (split layout: slices of SLURM_JOB_NODELIST;
     hetjob: SLURM_JOB_NODELIST_HET_GROUP_<n>; colocated: every role on the same nodes);
  2. per teacher (and rollout pool): its servers, each under a supervisor loop that restarts a
     server whose step exits, then its sglang-router; every /health is waited on;
  3. the trainer: one torchrun or ft_launcher per node (c10d rendezvous on the first trainer
     host) running `python -m megatron_opd.cli train <snapshot> teachers.<name>.endpoints=[...]`;
  4. preemption: SIGUSR1 (`--signal=B:USR1@N`) or SIGTERM to the batch shell is forwarded to
     the trainer step; the ranks save a checkpoint and stop; rank 0 then writes the stop marker
     ($OPD_STOP_MARKER, see megatron_opd/runtime/resiliency.py) and the script requeues the job,
     which resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_opd.config import ConfigError, JobConfig, dump_config, load_config
from megatron_opd.runtime.cluster import ClusterConfig, ServerPoolConfig

# Exit status of the batch script when the trainer stopped early and no requeue is left
# (sysexits' EX_TEMPFAIL: "try again later"): the run is resumable, not failed.
EXIT_STOPPED = 75
# Signals the launcher forwards to its ranks (torchrun's default set plus SLURM's warning signal).
_FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class ClusterConfigError(ConfigError):
    """The job cannot run as configured on the cluster; the message lists every problem and its fix."""


# ---------------------------------------------------------------------------------------------
# Loading


def load_job(path: str | os.PathLike, overrides: list[str] = ()) -> tuple[JobConfig, ClusterConfig]:
    """The job config and its cluster section from one YAML file plus dotted overrides."""
    job = load_config(path, overrides)
    return job, job.cluster


# ---------------------------------------------------------------------------------------------
# The plan: who runs where, on which port


@dataclass
class NodeGroup:
    """Hosts of one role instance: `count` nodes from `offset` in a SLURM host list."""

    var: str  # bash variable that holds the comma-separated host names
    count: int
    offset: int = 0
    het_group: int | None = None
    # A bash expression for the hosts instead of a slice of the host list (a router: the first
    # host of its pool's replica 0).
    expr: str = ""

    @property
    def nodelist_var(self) -> str:
        return "SLURM_JOB_NODELIST" if self.het_group is None else f"SLURM_JOB_NODELIST_HET_GROUP_{self.het_group}"

    @property
    def head(self) -> str:
        """Bash expression for the group's first host."""
        return "${" + self.var + "%%,*}"


@dataclass
class Server:
    name: str  # log and step name, e.g. teacher-math-0
    group: NodeGroup
    port: int
    argv: list[str]  # the command, shell words (may reference bash variables, see _word)

    @property
    def url(self) -> str:
        return f"http://{self.group.head}:{self.port}"


@dataclass
class Pool:
    """One teacher's (or the rollout engine's) servers and optional router."""

    key: str  # config path of the pool, e.g. cluster.teachers.math
    label: str  # e.g. teacher 'math'
    cfg: ServerPoolConfig
    model: str  # what the servers load (model_path, or the teacher's model_dir)
    servers: list[Server]
    router: Server | None
    signal: str = ""  # the teacher's signal kind

    @property
    def endpoints(self) -> list[str]:
        return [self.router.url] if self.router else [s.url for s in self.servers]


@dataclass
class JobPlan:
    job: JobConfig
    cluster: ClusterConfig
    snapshot: Path  # the job config the trainer reads (written at submission)
    log_dir: Path
    workdir: Path
    trainer: NodeGroup
    procs_per_node: int
    pools: list[Pool] = field(default_factory=list)
    het_groups: list[tuple[str, int, str]] = field(default_factory=list)  # (role, nodes, mem)
    total_nodes: int = 0

    @property
    def world_size(self) -> int:
        return self.trainer.count * self.procs_per_node


def _bash_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text).upper()


def plan(job, cluster: ClusterConfig, *, workdir: str | os.PathLike | None = None) -> JobPlan:
    """Assign node groups and ports to every role (no checks: see `check`)."""
    workdir = Path(cluster.workdir or workdir or os.getcwd()).resolve()
    run_dir = job.run_dir if Path(job.run_dir).is_absolute() else workdir / job.run_dir
    log_dir = Path(cluster.log_dir) if cluster.log_dir else run_dir / "slurm"
    log_dir = log_dir if log_dir.is_absolute() else workdir / log_dir
    procs = cluster.trainer.procs_per_node or max(1, cluster.gpus_per_node)

    next_offset = 0
    het_groups: list[tuple[str, int, str]] = []

    def group(var: str, count: int, role: str, mem: str, het_key: str | None = None) -> NodeGroup:
        """A node group for `role`; in a het job, replicas of one pool share one het group."""
        nonlocal next_offset
        if cluster.layout == "colocated":
            return NodeGroup(var, count, 0)
        if cluster.layout == "split":
            g = NodeGroup(var, count, next_offset)
            next_offset += count
            return g
        key = het_key or role
        for i, (name, nodes, _) in enumerate(het_groups):
            if name == key:
                het_groups[i] = (name, nodes + count, mem)
                return NodeGroup(var, count, nodes, i)
        het_groups.append((key, count, mem))
        return NodeGroup(var, count, 0, len(het_groups) - 1)

    trainer = group("TRAINER_NODES", cluster.trainer.nodes, "trainer", cluster.trainer.mem)
    ports = _PortCounter(cluster.base_port)
    pools = []
    for name in sorted(cluster.teachers):
        teacher = job.teachers.get(name)
        pools.append(
            _plan_pool(
                f"cluster.teachers.{name}", f"teacher '{name}'", f"teacher-{name}", cluster.teachers[name], cluster,
                group, ports, signal=teacher.signal if teacher else "",
                default_model=teacher.model_dir if teacher else "",
            )
        )  # fmt: skip
    if cluster.rollout.replicas > 0:
        # Our embedded server takes weight updates only when told where from (serving/weights.py).
        updates = ["--weights-dir", str(run_dir / "rollout_weights")] if job.rollout.weight_sync == "disk" else ["--weight-groups"]
        pools.append(_plan_pool("cluster.rollout", "rollout", "rollout", cluster.rollout, cluster, group, ports, embedded_args=updates))
    if cluster.layout == "colocated":
        sizes = [trainer.count] + [s.group.count for p in pools for s in p.servers]
        total = max(sizes)
    elif cluster.layout == "split":
        total = next_offset
    else:
        total = sum(n for _, n, _ in het_groups)
    return JobPlan(
        job=job,
        cluster=cluster,
        snapshot=log_dir / "job.yaml",
        log_dir=log_dir,
        workdir=workdir,
        trainer=trainer,
        procs_per_node=procs,
        pools=pools,
        het_groups=het_groups,
        total_nodes=total,
    )


class _PortCounter:
    def __init__(self, base: int):
        self.next = base

    def take(self, n: int) -> int:
        port, self.next = self.next, self.next + n
        return port


def _plan_pool(key, label, prefix, cfg: ServerPoolConfig, cluster, group, ports, *, signal="", default_model="", embedded_args=()) -> Pool:
    port = cfg.port or ports.take(max(cfg.replicas, 0))
    model = cfg.model_path or default_model
    servers = []
    for r in range(cfg.replicas):
        g = group(f"{_bash_name(prefix)}_{r}_NODES", cfg.nodes_per_replica, f"{prefix}-{r}", cfg.mem, het_key=prefix)
        servers.append(Server(f"{prefix}-{r}", g, port + r, []))
    for s in servers:
        s.argv = _server_argv(cfg, cluster, s, signal=signal, model=model, embedded_args=embedded_args)
    router = None
    if cfg.router and cfg.replicas > 0:
        router_port = cfg.router_port or ports.take(1)
        name = "router-" + prefix.removeprefix("teacher-")
        first = servers[0].group
        head = NodeGroup(_bash_name(name) + "_NODES", 1, first.offset, first.het_group, expr=first.head)
        router = Server(name, head, router_port, [])
        router.argv = [
            cluster.python, "-m", "sglang_router.launch_router",
            "--worker-urls", *[s.url for s in servers],
            "--policy", cfg.router_policy,
            "--host", "0.0.0.0", "--port", str(router_port),
        ]  # fmt: skip
        if cluster.api_key_env:
            router.argv += ["--api-key", f"${cluster.api_key_env}"]
    return Pool(key, label, cfg, model, servers, router, signal)


def _server_argv(cfg: ServerPoolConfig, cluster: ClusterConfig, server: Server, *, signal: str, model: str, embedded_args=()) -> list[str]:
    """The command of one server replica, with the flags its teacher's signal needs."""
    if cfg.backend == "embedded":
        argv = [cluster.python, "-m", "megatron_opd.serving", "--model-dir", model, *embedded_args]
    else:
        argv = [cluster.python, "-m", "sglang.launch_server", "--model-path", model,
                "--tp-size", str(cfg.tp), "--dp-size", str(cfg.dp), "--ep-size", str(cfg.ep),
                "--skip-tokenizer-init"]  # fmt: skip
        if cfg.nodes_per_replica > 1:
            # One task per node; the node rank is only known inside the task (see _task_words).
            argv += ["--nnodes", str(cfg.nodes_per_replica), "--node-rank", "$SLURM_NODEID",
                     "--dist-init-addr", f"{server.group.head}:{server.port + 1000}"]  # fmt: skip
        if signal == "hidden":
            # Hidden states come back only for positions computed in this request: no prefix
            # cache hits, no chunked prefill (notes/sglang-protocol.md, "Full vocabulary").
            argv += ["--enable-return-hidden-states", "--disable-radix-cache", "--chunked-prefill-size", "-1"]
        if cfg.mem_fraction:
            argv += ["--mem-fraction-static", str(cfg.mem_fraction)]
        if cfg.context_length:
            argv += ["--context-length", str(cfg.context_length)]
    argv += ["--host", "0.0.0.0", "--port", str(server.port)]
    if cluster.api_key_env and cfg.backend == "embedded":
        argv += ["--api-key-env", cluster.api_key_env]  # read in the server: the key stays out of ps
    elif cluster.api_key_env:  # stock SGLang takes the key itself
        argv += ["--api-key", f"${cluster.api_key_env}"]
    return argv + list(cfg.extra_args)


# ---------------------------------------------------------------------------------------------
# Checks before submission


def _mem_mb(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)B?", text.strip().upper())
    if not match:
        raise ValueError(text)
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2)]
    return max(1, int(int(match.group(1)) * scale))


def _seconds(time_limit: str) -> int:
    """A SLURM --time in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, dash, rest = time_limit.partition("-") if "-" in time_limit else ("0", "", time_limit)
    parts = [int(x) for x in rest.split(":")]
    if len(parts) > 3:
        raise ValueError(time_limit)
    if dash:  # after days the fields are hours[:minutes[:seconds]]
        h, m, s = (parts + [0, 0])[:3]
    else:
        h, m, s = [[0, parts[0], 0], [0, *parts], parts][len(parts) - 1]
    return int(days) * 86400 + h * 3600 + m * 60 + s


def check(p: JobPlan) -> None:
    """Raise `ClusterConfigError` listing every problem of the plan; nothing is submitted then.

    The job's own checks (`JobConfig.problems`: layout against the trainer's ranks, batch,
    teachers, stage keys) come first; then what only the cluster section can get wrong.
    """
    job, c = p.job, p.cluster
    # The batch script starts the servers and passes their URLs to the trainer as overrides.
    errors: list[str] = job.problems(p.world_size, endpoints_from_launcher=True)

    # -- node counts ----------------------------------------------------------------------------
    if c.trainer.nodes < 1:
        errors.append(f"cluster.trainer.nodes={c.trainer.nodes}: the trainer needs at least one node")
    needs = [f"trainer {c.trainer.nodes}"] + [
        f"{pool.key.removeprefix('cluster.')} {pool.cfg.replicas}x{pool.cfg.nodes_per_replica}" for pool in p.pools
    ]
    if c.nodes and c.nodes != p.total_nodes:
        how = "the most any role needs" if c.layout == "colocated" else "the sum over roles"
        errors.append(
            f"cluster.nodes={c.nodes} does not match the roles: {' + '.join(needs)} nodes, {how}: "
            f"{p.total_nodes}; set cluster.nodes={p.total_nodes} (or 0 to derive it) or change the role sizes"
        )

    # -- trainer ranks against GPUs and the parallel layout -----------------------------------
    if c.gpus_per_node and p.procs_per_node > c.gpus_per_node:
        errors.append(
            f"cluster.trainer.procs_per_node={p.procs_per_node} exceeds cluster.gpus_per_node={c.gpus_per_node}; "
            f"one rank per GPU at most"
        )

    # -- teachers: every one has servers, every pool belongs to a teacher ---------------------
    for name in sorted(job.teachers):
        teacher = job.teachers[name]
        pool = c.teachers.get(name)
        if teacher.placement == "in_job":  # the trainer loads it: no servers
            if pool is not None:
                errors.append(
                    f"teacher {name!r} has teachers.{name}.placement=in_job (the trainer loads it) and servers in "
                    f"cluster.teachers.{name}; remove cluster.teachers.{name} or set teachers.{name}.placement=server"
                )
            continue
        if pool is None and not teacher.endpoints:
            errors.append(
                f"teacher {name!r} has no servers: add cluster.teachers.{name} (model_path, replicas, tp) "
                f"or point teachers.{name}.endpoints at running servers"
            )
        elif pool is not None and teacher.endpoints:
            errors.append(
                f"teacher {name!r} has both teachers.{name}.endpoints {teacher.endpoints} and servers in "
                f"cluster.teachers.{name}; keep one"
            )
        if teacher.signal == "logits" and pool is not None and pool.backend == "sglang":
            errors.append(
                f"teachers.{name}.signal is 'logits', which only our embedded server sends; set "
                f"cluster.teachers.{name}.backend=embedded or use signal hidden, topk or sampled"
            )
    for name in sorted(set(c.teachers) - set(job.teachers)):
        close = difflib.get_close_matches(name, list(job.teachers), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"the job's teachers are {sorted(job.teachers)}"
        errors.append(f"cluster.teachers.{name} starts servers for a teacher the job does not have; {hint}")

    # -- rollout --------------------------------------------------------------------------------
    if c.rollout.replicas > 0 and job.rollout.engine != "sglang":
        errors.append(
            f"cluster.rollout starts {c.rollout.replicas} rollout servers but rollout.engine is "
            f"{job.rollout.engine!r}; set rollout.engine=sglang or cluster.rollout.replicas=0"
        )
    if job.rollout.engine == "sglang" and c.rollout.replicas < 1 and not job.rollout.endpoints:
        errors.append("rollout.engine is 'sglang' but no rollout server: set cluster.rollout.replicas or rollout.endpoints")

    # -- each server pool -------------------------------------------------------------------------
    for pool in p.pools:
        errors += _check_pool(pool, c)

    # -- memory, time, signal -------------------------------------------------------------------
    mems = {"cluster.trainer.mem": c.trainer.mem}
    for pool in p.pools:
        mems[f"{pool.key}.mem"] = pool.cfg.mem
        if pool.router:
            mems[f"{pool.key}.router_mem"] = pool.cfg.router_mem
    for key, value in mems.items():
        if value:
            try:
                _mem_mb(value)
            except ValueError:
                errors.append(f"{key}={value!r} is not a memory size (e.g. 4000M, 900G)")
        elif c.layout == "colocated" or key.endswith("router_mem"):
            errors.append(
                f"{key} is empty: with layout colocated every role shares the nodes, and a step without "
                f"--mem asks for the whole node; set it (e.g. {key}=4G)"
            )
    try:
        limit = _seconds(c.time)
    except ValueError:
        errors.append(f"cluster.time={c.time!r} is not a SLURM time ([D-]HH:MM:SS)")
    else:
        if c.signal_seconds and c.signal_seconds >= limit:
            errors.append(f"cluster.signal_seconds={c.signal_seconds} is not below the time limit {c.time} ({limit} s)")
        elif c.signal_seconds and c.trainer.stop_timeout_s > c.signal_seconds:
            errors.append(
                f"cluster.trainer.stop_timeout_s={c.trainer.stop_timeout_s} lets the ranks save for longer than "
                f"the warning comes before the time limit (cluster.signal_seconds={c.signal_seconds}); "
                f"raise signal_seconds or lower stop_timeout_s"
            )
    if c.container_mounts and not c.container_image:
        errors.append("cluster.container_mounts is set but cluster.container_image is empty")
    if errors:
        raise ClusterConfigError(
            f"{len(errors)} problem(s) with this job on the cluster; nothing was submitted:\n  - " + "\n  - ".join(errors)
        )


def _check_pool(pool: Pool, c: ClusterConfig) -> list[str]:
    cfg, key, errors = pool.cfg, pool.key, []
    if cfg.replicas < 1:
        errors.append(f"{key}.replicas={cfg.replicas}: {pool.label} needs at least one server")
    if cfg.nodes_per_replica < 1:
        errors.append(f"{key}.nodes_per_replica={cfg.nodes_per_replica} must be >= 1")
    for k in ("tp", "dp", "ep"):
        if getattr(cfg, k) < 1:
            errors.append(f"{key}.{k}={getattr(cfg, k)} must be >= 1")
    if not pool.model:
        errors.append(f"{key}.model_path is empty: say which model {pool.label} serves")
    if cfg.backend == "embedded":
        if (cfg.tp, cfg.dp, cfg.ep, cfg.nodes_per_replica) != (1, 1, 1, 1):
            errors.append(f"{key}: the embedded server runs one process per replica; set tp, dp, ep, nodes_per_replica to 1")
        if key == "cluster.rollout" and not c.api_key_env:
            errors.append(
                f"{key}: embedded rollout servers take weight updates and listen beyond their node, so they need a key: "
                f"set cluster.api_key_env"
            )
        return errors
    if not c.gpus_per_node:
        errors.append(f"{key}: SGLang servers need GPUs but cluster.gpus_per_node=0; use backend: embedded on CPU nodes")
        return errors
    gpus = cfg.nodes_per_replica * c.gpus_per_node
    if cfg.tp * cfg.dp > gpus:
        errors.append(
            f"{key}: tp*dp = {cfg.tp}*{cfg.dp} = {cfg.tp * cfg.dp} GPUs per replica, but a replica has "
            f"{cfg.nodes_per_replica} node(s) x {c.gpus_per_node} GPUs = {gpus}; raise nodes_per_replica or lower tp/dp"
        )
    elif cfg.nodes_per_replica > 1 and cfg.tp * cfg.dp != gpus:
        errors.append(
            f"{key}: a replica over {cfg.nodes_per_replica} nodes must use all their {gpus} GPUs, "
            f"but tp*dp = {cfg.tp * cfg.dp}"
        )
    if cfg.tp % cfg.ep:
        errors.append(f"{key}: ep={cfg.ep} must divide tp={cfg.tp} (SGLang's expert parallelism runs inside tp)")
    return errors


# ---------------------------------------------------------------------------------------------
# Rendering


def _word(text: str) -> str:
    """Quote one shell word, keeping $VARS and ${...} expandable (double quotes when needed)."""
    if "$" in text:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'
    return shlex.quote(text)


def _lines(words: list[str]) -> list[str]:
    """Group shell words into lines: a new line at each long option (`--x`), its values with it."""
    lines: list[str] = []
    for w in words:
        if not lines or re.match(r"^[\"']?--[A-Za-z]", w):
            lines.append(w)
        else:
            lines[-1] += " " + w
    return lines


def _wrap(*parts: list[str], indent: str = "    ") -> str:
    """A command over continuation lines: each part's words grouped by `_lines`, parts on new lines."""
    lines = [line for words in parts for line in _lines(words)]
    return (" \\\n" + indent).join(lines)


def _srun(p: JobPlan, g: NodeGroup, log_name: str, *, gpus: bool, mem: str, overlap: bool, cpus: bool = True) -> list[str]:
    c = p.cluster
    flags = ["srun"]
    if g.het_group is not None:
        flags.append(f"--het-group={g.het_group}")
    flags += [f'--nodelist="${g.var}"', f"--nodes={g.count}", f"--ntasks={g.count}", "--ntasks-per-node=1"]
    if cpus:
        flags.append(f"--cpus-per-task={c.cpus_per_node}" if c.cpus_per_node else '--cpus-per-task="$SLURM_CPUS_ON_NODE"')
    if gpus and c.gpus_per_node:
        flags.append(f"--gpus-per-node={c.gpus_per_node}")
    if mem:
        flags.append(f"--mem={mem}")
    if overlap:
        flags.append("--overlap")
    flags += [f'--output="$LOGS/{log_name}-%N.log"', "--open-mode=append"]
    if c.container_image:
        flags.append(f"--container-image={shlex.quote(c.container_image)}")
        if c.container_mounts:
            flags.append(f"--container-mounts={shlex.quote(','.join(c.container_mounts))}")
        flags.append(f"--container-workdir={shlex.quote(str(p.workdir))}")
    return flags


def _env_prefix(env: dict[str, str]) -> list[str]:
    return ["env", *[f"{k}={_word(v)}" for k, v in sorted(env.items())]] if env else []


_PER_TASK = ("$SLURM_NODEID", "$SLURM_PROCID")


def _task_words(argv: list[str]) -> list[str]:
    """Shell words for srun's command.

    A command that reads per-task variables (a multi-node server's node rank) runs under
    `bash -c "..."`: the batch script expands its own variables into the string, and `\$SLURM_NODEID`
    is left for the task's shell.
    """
    if not any(v in a for a in argv for v in _PER_TASK):
        return [_word(a) for a in argv]
    inner = []
    for a in argv:
        if a in _PER_TASK:
            inner.append("\\" + a)
            continue
        if "'" in a:
            raise ValueError(f"cannot pass {a!r} through bash -c: it contains a single quote")
        inner.append("'" + a.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + "'")
    return ["bash", "-c", '"exec ' + " ".join(inner) + '"']


# The batch script's functions (log, slice_hosts, wait_healthy, supervise, cleanup, on_stop,
# requeue_or_exit, not_ready) live in a real shell file, inlined into every rendered script.
RUNTIME_SH = "slurm_runtime.sh"


def runtime_bash() -> str:
    """The text of launchers/slurm_runtime.sh (package data, found in an installed package too)."""
    return importlib.resources.files("launchers").joinpath(RUNTIME_SH).read_text()


def render(p: JobPlan) -> str:
    """The sbatch script for plan `p` (call `check(p)` first)."""
    c = p.cluster
    out: list[str] = ["#!/bin/bash"]
    out += _header_comment(p)
    out += _sbatch_lines(p)
    out.append("")
    out.append("set -uo pipefail")
    out.append("")
    out.append(f"# -- helpers: launchers/{RUNTIME_SH} " + "-" * 66)
    out.append(runtime_bash().rstrip("\n"))
    out.append("")
    out.append("# -- environment " + "-" * 80)
    out += list(c.setup)
    for k, v in sorted(c.env.items()):
        out.append(f"export {k}={_word(v)}")
    out += [
        f"JOB_CONFIG={shlex.quote(str(p.snapshot))}  # the checked job config, written at submission",
        f"LOG_DIR={shlex.quote(str(p.log_dir))}",
        "ATTEMPT=${SLURM_RESTART_COUNT:-0}  # 0, then 1, 2, ... after each requeue",
        'LOGS="$LOG_DIR/job-$SLURM_JOB_ID-$ATTEMPT"  # one log file per role and node in here',
        'mkdir -p "$LOGS"',
        f"HEALTH_TIMEOUT={c.health_timeout_s}",
        f"REQUEUE={int(c.requeue)}",
        f"MAX_REQUEUES={c.max_requeues}",
        f"EXIT_STOPPED={EXIT_STOPPED}",
        # The trainer's rank 0 writes this after the checkpoint of an early stop is complete.
        'export OPD_STOP_MARKER="$LOGS/stopped"',
    ]
    if c.api_key_env:
        out += [
            f': "${{{c.api_key_env}:?export the teacher API key in {c.api_key_env} before sbatch}}"',
            f'AUTH_HEADER="Authorization: Bearer ${c.api_key_env}"',
        ]
    else:
        out.append('AUTH_HEADER=""')
    out.append('log "job $SLURM_JOB_ID attempt $ATTEMPT on $SLURM_JOB_NODELIST; logs in $LOGS"')
    out.append("")
    out += _node_group_lines(p)
    if p.pools:
        out.append("")
        out.append("# -- servers: all start at once; the trainer starts when every /health answers " + "-" * 10)
        for pool in p.pools:
            out += _server_lines(p, pool)
        urls = [_word(s.url) for pool in p.pools for s in pool.servers]
        out.append(_wrap(["wait_healthy", "/health"], urls) + " || not_ready")
    routers = [pool for pool in p.pools if pool.router]
    if routers:
        out.append("")
        out.append("# -- routers: one per pool, in front of its replicas " + "-" * 43)
        for pool in routers:
            out += _router_lines(p, pool)
        # A router's /health answers before any worker is registered; /get_model_info is
        # forwarded to a worker, so it answers only once requests get through.
        urls = [_word(pool.router.url) for pool in routers]
        out.append(_wrap(["wait_healthy", "/get_model_info"], urls) + " || not_ready")
    out.append("")
    out += _trainer_lines(p)
    return "\n".join(out) + "\n"


def _header_comment(p: JobPlan) -> list[str]:
    c, job = p.cluster, p.job
    lines = [
        f"# megatron-opd job {job.run.name!r} (stage {job.stage}), rendered by launchers/slurm.py.",
        f"# Layout {c.layout}, {p.total_nodes} node(s):",
        f"#   trainer: {c.trainer.nodes} node(s) x {p.procs_per_node} ranks ({c.trainer.launcher}), "
        f"tp={job.parallel.tp} pp={job.parallel.pp} ep={job.parallel.ep}",
    ]
    for pool in p.pools:
        cfg = pool.cfg
        extra = f", tp={cfg.tp} dp={cfg.dp} ep={cfg.ep}" if cfg.backend == "sglang" else ""
        router = ", behind sglang-router" if pool.router else ""
        lines.append(
            f"#   {pool.label}: {cfg.replicas} replica(s) x {cfg.nodes_per_replica} node(s) ({cfg.backend}{extra}){router}"
        )
    lines.append("# Render again rather than editing: python -m launchers.slurm CONFIG --dry-run")
    return lines


def _sbatch_lines(p: JobPlan) -> list[str]:
    c = p.cluster
    name = c.job_name or p.job.run.name
    common = [f"--job-name={name}", f"--time={c.time}", f"--output={p.log_dir}/job-%j.log", "--open-mode=append",
              f"--chdir={p.workdir}"]  # fmt: skip
    if c.signal_seconds:
        common.append(f"--signal=B:USR1@{c.signal_seconds}")
    common.append("--requeue" if c.requeue else "--no-requeue")

    def resources(nodes: int, mem: str) -> list[str]:
        r = []
        for key in ("partition", "account", "qos"):
            if getattr(c, key):
                r.append(f"--{key}={getattr(c, key)}")
        r += [f"--nodes={nodes}", "--ntasks-per-node=1"]
        if c.cpus_per_node:
            r.append(f"--cpus-per-task={c.cpus_per_node}")
        if c.gpus_per_node:
            r.append(f"--gpus-per-node={c.gpus_per_node}")
        r.append(f"--mem={mem}")
        if c.exclusive:
            r.append("--exclusive")
        return r

    lines = []
    if c.layout == "hetjob":
        routers = {f"teacher-{pool.key.rsplit('.', 1)[-1]}" if "teachers" in pool.key else "rollout": pool
                   for pool in p.pools if pool.router}  # fmt: skip
        for i, (role, nodes, mem) in enumerate(p.het_groups):
            if i:
                lines.append("#SBATCH hetjob")
            lines.append(f"# het group {i}: {role}")
            if mem and role in routers:  # the router shares the first node of the group
                mem = f"{_mem_mb(mem) + _mem_mb(routers[role].cfg.router_mem)}M"
            lines += [f"#SBATCH {o}" for o in (common if i == 0 else []) + resources(nodes, mem or "0")]
    else:
        lines += [f"#SBATCH {o}" for o in common + resources(p.total_nodes, _job_mem(p))]
    lines += [f"#SBATCH {a}" for a in c.sbatch_args]
    return lines


def _job_mem(p: JobPlan) -> str:
    """--mem per node of one allocation: the sum of the roles sharing a node (colocated), else
    the largest role; 0 (the whole node) when a role leaves its memory open."""
    c = p.cluster
    mems = [c.trainer.mem] + [pool.cfg.mem for pool in p.pools]
    if not all(mems):
        return "0"
    if c.layout == "colocated":
        routers = sum(_mem_mb(pool.cfg.router_mem) for pool in p.pools if pool.router)
        servers = sum(_mem_mb(pool.cfg.mem) * pool.cfg.replicas for pool in p.pools)
        return f"{_mem_mb(c.trainer.mem) + servers + routers}M"
    # A router shares the first node of its pool's replica 0.
    per_node = [_mem_mb(c.trainer.mem)] + [
        _mem_mb(pool.cfg.mem) + (_mem_mb(pool.cfg.router_mem) if pool.router else 0) for pool in p.pools
    ]
    return f"{max(per_node)}M"


def _node_group_lines(p: JobPlan) -> list[str]:
    lines = ["# -- node groups: the hosts each role runs on " + "-" * 50]
    groups = [("trainer", p.trainer)] + [(s.name, s.group) for pool in p.pools for s in pool.servers]
    groups += [(pool.router.name, pool.router.group) for pool in p.pools if pool.router]
    for role, g in groups:
        if g.expr:
            lines.append(f'{g.var}="{g.expr}"  # {role}')
        else:
            lines.append(f'{g.var}=$(slice_hosts "${g.nodelist_var}" {g.offset} {g.count})  # {role}')
    lines.append('log "trainer on $TRAINER_NODES"')
    for pool in p.pools:
        for s in pool.servers:
            lines.append(f'log "{s.name} on ${s.group.var}"')
    return lines


def _server_lines(p: JobPlan, pool: Pool) -> list[str]:
    cfg = pool.cfg
    what = f"{cfg.backend}" + (f", tp={cfg.tp} dp={cfg.dp} ep={cfg.ep}" if cfg.backend == "sglang" else "")
    lines = [f"# {pool.label}: {cfg.replicas} server(s) ({what}); a server that exits is started again, up to {cfg.max_restarts} times"]
    overlap = p.cluster.layout == "colocated"
    for s in pool.servers:
        srun = _srun(p, s.group, s.name, gpus=True, mem=cfg.mem, overlap=overlap)
        command = _env_prefix(cfg.env) + _task_words(s.argv)
        lines.append(_wrap(["supervise", s.name, str(cfg.max_restarts), str(cfg.restart_delay_s), *srun], command) + " &")
        lines.append('SUPERVISORS+=($!)')
    return lines


def _router_lines(p: JobPlan, pool: Pool) -> list[str]:
    r = pool.router
    lines = [f"# sglang-router for {pool.label}: health-checks its replicas, retries a failed request on another"]
    srun = _srun(p, r.group, r.name, gpus=False, mem=pool.cfg.router_mem, overlap=True, cpus=False)
    restart = [str(pool.cfg.max_restarts), str(pool.cfg.restart_delay_s)]
    lines.append(_wrap(["supervise", r.name, *restart, *srun], _task_words(r.argv)) + " &")
    lines.append('SUPERVISORS+=($!)')
    return lines


def _trainer_command(p: JobPlan) -> list[list[str]]:
    """The trainer task's command in parts (launcher, train command, one override each) for `_wrap`."""
    c, t = p.cluster, p.cluster.trainer
    rdzv = [f"--nnodes={t.nodes}", f"--nproc-per-node={p.procs_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={p.trainer.head}:{t.rdzv_port}", "--rdzv-id=$SLURM_JOB_ID",
            f"--max-restarts={t.max_restarts}"]  # fmt: skip
    if t.launcher == "torchrun":
        launcher = [c.python, "-m", "torch.distributed.run", *rdzv,
                    f"--signals-to-handle={_FORWARDED_SIGNALS}", f"--shutdown-timeout={t.stop_timeout_s}"]  # fmt: skip
        env = {}
    else:
        launcher = [c.python, "-m", "nvidia_resiliency_ext.fault_tolerance.launcher", *rdzv,
                    f"--ft-initial-rank-heartbeat-timeout={t.initial_heartbeat_timeout_s:g}",
                    f"--ft-rank-heartbeat-timeout={t.heartbeat_timeout_s:g}",
                    f"--term-timeout={t.stop_timeout_s}", "--ignore-missing-fault-tol-cfg"]  # fmt: skip
        # ft_launcher has no --signals-to-handle flag; torch's process context reads this variable.
        env = {"TORCHELASTIC_SIGNALS_TO_HANDLE": _FORWARDED_SIGNALS}
    overrides = []
    for pool in p.pools:
        if pool.key == "cluster.rollout":
            overrides.append(f"rollout.endpoints=[{','.join(pool.endpoints)}]")
            continue
        name = pool.key.removeprefix("cluster.teachers.")
        overrides.append(f"teachers.{name}.endpoints=[{','.join(pool.endpoints)}]")
        if c.api_key_env:  # the variable's name: the key stays in the environment, out of every file
            overrides.append(f"teachers.{name}.api_key_env={c.api_key_env}")
    if c.api_key_env and any(pool.key == "cluster.rollout" for pool in p.pools):
        overrides.append(f"rollout.api_key_env={c.api_key_env}")
    words = lambda argv: [_word(a) for a in argv]  # noqa: E731
    parts = [_env_prefix({**env, **t.env}), words(launcher + list(t.launcher_args))]
    parts.append(words(["-m", "megatron_opd.cli", "train", "$JOB_CONFIG"]))
    return [part for part in parts if part] + [[_word(o)] for o in overrides]


def _trainer_lines(p: JobPlan) -> list[str]:
    t = p.cluster.trainer
    overlap = p.cluster.layout == "colocated"
    srun = _srun(p, p.trainer, "trainer", gpus=True, mem=t.mem, overlap=overlap)
    lines = [
        f"# -- trainer: {t.nodes} node(s) x {p.procs_per_node} ranks under {t.launcher} ".ljust(96, "-"),
        "# It resumes from the newest complete checkpoint of the run by itself (a requeued job too).",
        'if [[ -n $STOP_REQUESTED ]]; then requeue_or_exit; fi',
        'rm -f "$OPD_STOP_MARKER"',
        _wrap(srun + ["--kill-on-bad-exit=1"], *_trainer_command(p)) + " &",
        "TRAINER_PID=$!",
        "while true; do",
        '    wait "$TRAINER_PID"',
        "    rc=$?",
        "    # wait returns early (status > 128) when a trapped signal arrives; the step still runs.",
        '    if ((rc > 128)) && kill -0 "$TRAINER_PID" 2>/dev/null; then continue; fi',
        "    break",
        "done",
        'if [[ -f $OPD_STOP_MARKER ]]; then',
        '    log "the trainer saved a checkpoint and stopped early (status $rc)"',
        "    requeue_or_exit",
        "fi",
        'log "trainer finished with status $rc"',
        'exit "$rc"',
    ]
    return lines


# ---------------------------------------------------------------------------------------------
# Submission


@dataclass
class Submission:
    job_id: str
    script: Path
    snapshot: Path
    log_dir: Path


def prepare(config: str | os.PathLike, overrides: list[str] = (), *, workdir: str | os.PathLike | None = None) -> JobPlan:
    """Load, plan and check: everything but writing and submitting."""
    job, cluster = load_job(config, overrides)
    p = plan(job, cluster, workdir=workdir)
    check(p)
    return p


def submit(p: JobPlan, *, sbatch: str = "sbatch", extra_args: list[str] = ()) -> Submission:
    """Write the script and job snapshot under the log dir, `sbatch --parsable` it; return the job id."""
    check(p)  # never submit an unchecked plan
    p.log_dir.mkdir(parents=True, exist_ok=True)
    dump_config(p.job, p.snapshot)
    script = p.log_dir / "sbatch.sh"
    script.write_text(render(p))
    result = subprocess.run([sbatch, "--parsable", *extra_args, str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed with status {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise RuntimeError(f"sbatch printed {result.stdout!r}, not a job id")
    return Submission(job_id, script, p.snapshot, p.log_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="job YAML with a cluster: section (configs/cluster/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, cluster.* included")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; write and submit nothing")
    parser.add_argument("--sbatch", default="sbatch", help="the sbatch executable")


def submit_command(args) -> int:
    """`megatron-opd submit CONFIG [overrides] [--dry-run]`; a `ConfigError` means nothing was submitted."""
    job, _ = load_job(args.config, args.overrides)
    if job.recipe.methods:  # the recipe: a chain of jobs with dependencies (launchers/recipe.py)
        from launchers.recipe import submit_recipe_command

        return submit_recipe_command(job, dry_run=args.dry_run, sbatch=args.sbatch)
    p = prepare(args.config, args.overrides)
    if args.dry_run:
        sys.stdout.write(render(p))
        return 0
    sub = submit(p, sbatch=args.sbatch)
    print(sub.job_id)
    print(f"submitted job {sub.job_id}: script {sub.script}, logs in {sub.log_dir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.slurm", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return submit_command(parser.parse_args(argv))
    except ConfigError as e:  # as `megatron-opd submit` does: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
