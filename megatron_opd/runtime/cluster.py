"""`ClusterConfig`: how a job is laid out on a SLURM cluster (the `cluster:` section of a job YAML).

Light on purpose (dataclasses only, no torch): `megatron_opd.config` can import it, and
`launchers.slurm` renders an sbatch script from it. Roles and what each becomes:

    trainer     `trainer.nodes` nodes, one torchrun / ft_launcher per node, `procs_per_node` ranks each
    teachers    per teacher name: `replicas` SGLang servers of `nodes_per_replica` nodes each (or
                our embedded server with `backend: embedded`), one sglang-router in front
    rollout     `replicas` SGLang servers for the student's samples (0: sample in-job)

    cluster:
      partition: batch
      account: my-account
      time: "04:00:00"
      gpus_per_node: 8
      trainer: {nodes: 2, mem: 900G}
      teachers:
        math: {model_path: /models/math-expert, replicas: 1, tp: 8}
        code: {model_path: /models/code-expert, replicas: 1, tp: 8}

Every value is checked by `megatron_opd.config.build` (unknown keys and wrong types are errors);
`launchers.slurm.check` checks the combination against the job before anything is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainerRoleConfig:
    """The trainer ranks: one launcher process per node, `procs_per_node` ranks under each."""

    nodes: int = 1
    # Ranks per node (0: one per GPU, `gpus_per_node`; one on a node without GPUs).
    procs_per_node: int = 0
    # torchrun, or NVRx's ft_launcher (heartbeat hang detection and in-job restarts of the group).
    launcher: Literal["torchrun", "ft_launcher"] = "torchrun"
    # Restarts of the whole rank group by the launcher before the step fails (node-local faults).
    max_restarts: int = 0
    rdzv_port: int = 29500
    # Seconds the ranks get to write their checkpoint after a stop signal before the launcher
    # kills them (torchrun --shutdown-timeout, ft_launcher --term-timeout).
    stop_timeout_s: int = 600
    # ft_launcher: the first heartbeat must come within this (set-up, resume, first step), and
    # each next one within `heartbeat_timeout_s` (a step, plus evaluation and checkpoint saves).
    initial_heartbeat_timeout_s: float = 1800.0
    heartbeat_timeout_s: float = 600.0
    # Further launcher flags, verbatim (e.g. ["--ft-restart-check-interval=5"]).
    launcher_args: list[str] = field(default_factory=list)
    mem: str = ""  # --mem per node ("": the whole node's memory)
    env: dict[str, str] = field(default_factory=dict)  # exported for the trainer step only


@dataclass
class ServerPoolConfig:
    """Servers of one teacher (or of the rollout engine): replicas behind one router."""

    # sglang: `python -m sglang.launch_server`; embedded: our `python -m megatron_opd.serving`.
    backend: Literal["sglang", "embedded"] = "sglang"
    # sglang: --model-path (HF directory); embedded: --model-dir ("" = the teacher's model_dir).
    model_path: str = ""
    replicas: int = 1
    nodes_per_replica: int = 1
    # SGLang parallelism of one replica: tp * dp GPUs (across its nodes); ep divides tp.
    tp: int = 1
    dp: int = 1
    ep: int = 1
    mem_fraction: float = 0.0  # --mem-fraction-static (0: SGLang's default)
    context_length: int = 0  # --context-length (0: the model's)
    port: int = 0  # HTTP port of replica 0; replica r uses port + r (0: assigned from cluster.base_port)
    router: bool = True  # one sglang-router in front of the replicas (off: the client fails over itself)
    router_port: int = 0  # 0: assigned from cluster.base_port
    router_policy: Literal["cache_aware", "round_robin", "power_of_two", "random"] = "cache_aware"
    router_mem: str = "2G"  # --mem of the router step (it shares replica 0's first node)
    # The batch script restarts a replica whose server exits, this many times, this long after.
    max_restarts: int = 3
    restart_delay_s: int = 5
    mem: str = ""  # --mem per node
    extra_args: list[str] = field(default_factory=list)  # server flags, verbatim
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterConfig:
    job_name: str = ""  # "" = run.name
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "04:00:00"  # --time, [D-]HH:MM:SS
    # split: one allocation, node groups per role (disjoint); hetjob: one SLURM het group per role;
    # colocated: every role on the same nodes (one-node tests and debugging; needs every mem set).
    layout: Literal["split", "hetjob", "colocated"] = "split"
    # Total nodes of the job (0: what the roles need). When set, it must match the roles.
    nodes: int = 0
    gpus_per_node: int = 8  # 0 on CPU nodes
    cpus_per_node: int = 0  # --cpus-per-task of the one task per node (0: SLURM's default)
    exclusive: bool = False
    # SIGUSR1 this many seconds before the time limit (#SBATCH --signal=B:USR1@N): the trainer
    # saves a checkpoint and stops, and the job requeues itself (0: no warning signal).
    signal_seconds: int = 600
    requeue: bool = True
    max_requeues: int = 10  # the script stops requeueing after this many restarts
    # pyxis/enroot: run every step in this image with these mounts ("src:dst").
    container_image: str = ""
    container_mounts: list[str] = field(default_factory=list)
    python: str = "python"  # the interpreter every step runs (a venv's python, or inside the image)
    workdir: str = ""  # the job's working directory ("" = where it is submitted from)
    log_dir: str = ""  # "" = <run dir>/slurm
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, source ...)
    env: dict[str, str] = field(default_factory=dict)  # exported for every step
    # Name of the environment variable holding the teachers' API key (never written into the script).
    api_key_env: str = ""
    base_port: int = 30000  # server and router ports not given explicitly count up from here
    health_timeout_s: int = 1800  # every server and router must answer /health within this
    sbatch_args: list[str] = field(default_factory=list)  # further #SBATCH lines, e.g. "--constraint=h100"
    trainer: TrainerRoleConfig = field(default_factory=TrainerRoleConfig)
    teachers: dict[str, ServerPoolConfig] = field(default_factory=dict)
    rollout: ServerPoolConfig = field(default_factory=lambda: ServerPoolConfig(replicas=0))
