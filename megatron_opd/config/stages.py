"""The stage registry: stage name -> where its class lives and its rank-free config check.

Torch-free: the table names each stage's class as "module:Class", imported only when the stage
runs (`megatron_opd.stages.launch.make_stage`), so a login node checks a job's stage-specific
keys without importing torch. A name mapped to None is planned but not implemented: a config
naming it is refused at load time, like an unknown name.

Adding a stage is one line in `STAGES` plus its check function here (and its section, if it
has keys of its own, in config/job.py):

    "grm": StageSpec("megatron_opd.stages.grm:GRMStage", check_grm, "generative reward model"),
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from megatron_opd.config.typed import ConfigError
from megatron_opd.runtime.layout import ParallelLayout
from megatron_opd.teachers.config import check_teachers

if TYPE_CHECKING:
    from megatron_opd.config.job import JobConfig


@dataclass(frozen=True)
class CheckContext:
    """What a stage check may need to know about the launch besides the config itself."""

    world_size: int
    layout: ParallelLayout | None  # resolved against the world (None: it does not fit)
    endpoints_from_launcher: bool = False  # the launcher starts the servers and fills in endpoints
    # `megatron-opd run`: its pipeline (the pipeline: section) trains the experts into model dirs
    # of its choosing and starts their servers.
    by_pipeline: bool = False

    @property
    def endpoints_given(self) -> bool:
        """Whether the config itself must name the servers' URLs."""
        return not (self.endpoints_from_launcher or self.by_pipeline)


@dataclass(frozen=True)
class StageSpec:
    target: str  # "module:Class", constructed as Class(cfg, trainer, tokenizer)
    check: Callable[["JobConfig", CheckContext], list[str]]  # problems, each naming its key
    summary: str


# ---------------------------------------------------------------------------------------------
# Stage checks: every check of a stage's keys that needs no ranks


def check_sft(cfg: "JobConfig", ctx: CheckContext) -> list[str]:
    return []  # SFT has no keys of its own; the loop's sections are checked by JobConfig


def check_opd(cfg: "JobConfig", ctx: CheckContext) -> list[str]:
    problems: list[str] = []
    if not cfg.teachers:
        return ["stage opd needs teachers: the teachers: section is empty; add teachers.NAME with its domains"]
    problems += _raised(check_teachers, cfg.teachers, endpoints_required=ctx.endpoints_given)
    owner = {d: n for n, t in cfg.teachers.items() for d in t.domains}
    where = "data.datasets" if cfg.data.datasets else "data.domains"
    for domain in cfg.data.source_domains:
        if domain not in owner:
            problems.append(
                f"domain {domain!r} ({where}) has no teacher; add it to the domains of one "
                f"of teachers {sorted(cfg.teachers)}"
            )
    for i, d in enumerate(cfg.data.datasets):
        if not d.verifier:  # on-policy stages verify every rollout (per-domain accuracy in the report)
            problems.append(
                f"data.datasets[{i}] ({d.path}) has no verifier, which the opd stage scores its domain "
                f"{d.domain!r} with; set data.datasets[{i}].verifier (math, code, exact, regex)"
            )
    for name in sorted(cfg.teachers):
        t = cfg.teachers[name]
        if t.signal == "hidden" and not t.model_dir and not ctx.by_pipeline:
            problems.append(
                f"teachers.{name}.signal is 'hidden' but teachers.{name}.model_dir is empty: the trainer "
                f"needs the teacher's output layer from it; set it, or use signal topk or sampled"
            )
        if t.signal in ("topk", "sampled") and t.temperature != 1.0:
            problems.append(
                f"teachers.{name}.temperature={t.temperature} needs the full distribution; with "
                f"signal={t.signal!r} servers return raw (T=1) log-probs and the tempered teacher "
                f"cannot be rebuilt: use signal=hidden or temperature=1.0"
            )
    if cfg.opd.fused_output_layer and cfg.parallel.sequence_parallel:
        problems.append(
            "opd.fused_output_layer needs parallel.sequence_parallel=false (the fused loss takes the "
            "full hidden states on every TP rank)"
        )
    if cfg.opd.fused_chunk_size < 1:
        problems.append(f"opd.fused_chunk_size must be >= 1, got {cfg.opd.fused_chunk_size}")
    if cfg.opd.resident_teachers < 1:
        problems.append(
            f"opd.resident_teachers must be >= 1 (in-job teachers on the device at once), got {cfg.opd.resident_teachers}"
        )
    if cfg.opd.teacher_weights not in ("disk", "host"):
        problems.append(f"opd.teacher_weights={cfg.opd.teacher_weights!r}; expected disk or host")
    problems += _raised(cfg.rollout.check, endpoints_required=ctx.endpoints_given, model=cfg.model, layout=ctx.layout)
    if ctx.by_pipeline:  # only `megatron-opd run` reads the pipeline: and recipe: sections
        problems += _raised(cfg.pipeline.check, cfg.teachers)
        problems += _raised(cfg.recipe.check)
    return problems


def check_grpo(cfg: "JobConfig", ctx: CheckContext) -> list[str]:
    g, problems = cfg.grpo, []
    if g.group_size < 2:
        problems.append(
            f"grpo.group_size={g.group_size}: GRPO compares the samples of one prompt, and a group of one has "
            f"advantage 0 and no signal; set grpo.group_size >= 2"
        )
    if g.updates_per_batch < 1:
        problems.append(f"grpo.updates_per_batch must be >= 1 (optimizer updates per rollout batch), got {g.updates_per_batch}")
    elif g.group_size >= 2:
        dp = ctx.layout.dp if ctx.layout is not None else 1
        samples = cfg.train.global_batch_size * g.updates_per_batch
        if samples % (g.group_size * dp):
            problems.append(
                f"a rollout of train.global_batch_size x grpo.updates_per_batch = {samples} samples does not split "
                f"into groups of grpo.group_size={g.group_size} over {dp} data-parallel replicas; make "
                f"train.global_batch_size x grpo.updates_per_batch a multiple of {g.group_size * dp}"
            )
    if not 0 <= g.eps_low < 1:
        problems.append(f"grpo.eps_low must be in [0, 1) (the clip range starts at 1 - eps_low), got {g.eps_low}")
    if not 0 <= g.eps_high < math.inf:
        problems.append(f"grpo.eps_high must be a finite number >= 0, got {g.eps_high}")
    if not 0 <= g.kl_coef < math.inf:
        problems.append(f"grpo.kl_coef must be a finite number >= 0 (0: no reference model), got {g.kl_coef}")
    elif g.kl_coef > 0 and not (g.reference or cfg.train.init_from):
        problems.append(
            f"grpo.kl_coef={g.kl_coef} > 0 needs reference weights, and neither grpo.reference nor "
            f"train.init_from names any: set train.init_from to the warm start (the reference keeps its "
            f"weights) or grpo.reference to a checkpoint, or set grpo.kl_coef=0"
        )
    if g.opsm_delta is not None and not math.isfinite(g.opsm_delta):
        problems.append(f"grpo.opsm_delta must be a finite number or null (off), got {g.opsm_delta}")
    for key in ("keep_sampling_mask", "dynamic_sampling"):
        if not isinstance(getattr(g, key), bool):
            problems.append(f"grpo.{key} must be true or false, got {getattr(g, key)!r}")
    if g.refill_rounds < 0 or (g.dynamic_sampling and g.refill_rounds < 1):
        problems.append(
            f"grpo.refill_rounds={g.refill_rounds}: dynamic sampling refills dropped groups at most this many "
            f"times per rollout; set it >= 1 (or grpo.dynamic_sampling=false)"
        )
    if cfg.rollout.temperature == 0:
        problems.append(
            "rollout.temperature=0 samples greedily: every sample of a group is the same response, so no "
            "group has an advantage; GRPO needs rollout.temperature > 0"
        )
    problems += _raised(cfg.rollout.check, endpoints_required=ctx.endpoints_given)
    return problems


def check_grm(cfg: "JobConfig", ctx: CheckContext) -> list[str]:
    """GRPO's checks, the grm section's, and what the in-job judge needs."""
    problems = check_grpo(cfg, ctx) + _raised(cfg.grm.check)
    if "rubric" not in cfg.data.domains and "judge" not in cfg.data.domains:
        problems.append(f"stage grm trains on the GRM's domains: set data.domains to [rubric], [judge] or "
                        f"[rubric, judge], got {cfg.data.domains}")  # fmt: skip
    problems += _in_job_judge(cfg, ctx)
    if cfg.grm.policy_reward != "judge" and "rubric" not in cfg.data.domains:
        problems.append(f"grm.policy_reward={cfg.grm.policy_reward} is the rubric task's reward, but data.domains="
                        f"{cfg.data.domains} has no rubric")  # fmt: skip
    if cfg.grm.judge == "frozen" and not (cfg.grm.judge_weights or cfg.train.init_from):
        problems.append("grm.judge=frozen needs the snapshot's weights: set grm.judge_weights or train.init_from")
    return problems


def check_grm_sft(cfg: "JobConfig", ctx: CheckContext) -> list[str]:
    """The GRM cold start: SFT on the GRM's domains, evaluated with the in-job judge."""
    problems = _raised(cfg.grm.check)
    if not set(cfg.data.domains) <= {"rubric", "judge"}:
        problems.append(f"stage grm_sft trains on the GRM's domains [rubric, judge], got data.domains={cfg.data.domains}")
    return problems + _in_job_judge(cfg, ctx)


def check_grm_rm(cfg: "JobConfig", ctx: CheckContext) -> list[str]:
    """The scalar reward model: fit on the annotations (data.domains [judge]) from a backbone, on
    one model-parallel rank (its value column is the output layer's first padding row)."""
    problems = _raised(cfg.grm.check)
    if list(cfg.data.domains) != ["judge"]:
        problems.append(f"stage grm_rm fits the annotations: set data.domains=[judge], got {cfg.data.domains}")
    if ctx.layout is not None and (ctx.layout.tp > 1 or ctx.layout.pp > 1):
        problems.append(f"stage grm_rm reads its value column on one rank: it needs parallel.tp=1 and parallel.pp=1 "
                        f"(got tp={ctx.layout.tp}, pp={ctx.layout.pp})")  # fmt: skip
    if cfg.model.padded_vocab_size(1) <= cfg.model.vocab_size:
        problems.append(f"stage grm_rm reads its value from a padding row of the output layer, but "
                        f"model.vocab_size={cfg.model.vocab_size} with model.make_vocab_size_divisible_by="
                        f"{cfg.model.make_vocab_size_divisible_by} pads to no extra row; raise make_vocab_size_divisible_by")  # fmt: skip
    return problems


def _in_job_judge(cfg: "JobConfig", ctx: CheckContext) -> list[str]:
    # The in-job judge generates on the replica's first rank alone (inside the reward call).
    if cfg.grm.judge != "http" and ctx.layout is not None and (ctx.layout.tp > 1 or ctx.layout.pp > 1):
        return [f"grm.judge={cfg.grm.judge} judges in-job on one rank per replica: it needs parallel.tp=1 and "
                f"parallel.pp=1 (got tp={ctx.layout.tp}, pp={ctx.layout.pp}); serve the judge and use grm.judge=http"]  # fmt: skip
    return []


def _raised(check: Callable[..., object], *args, **kwargs) -> list[str]:
    """[the message] of the ValueError `check` raises, or []."""
    try:
        check(*args, **kwargs)
    except ValueError as e:
        return [str(e)]
    return []


# ---------------------------------------------------------------------------------------------
# The table

STAGES: dict[str, StageSpec | None] = {
    "sft": StageSpec("megatron_opd.stages.sft:SFTStage", check_sft, "supervised fine-tuning on demonstrations"),
    "opd": StageSpec("megatron_opd.stages.opd:OPDStage", check_opd, "multi-teacher on-policy distillation"),
    "grpo": StageSpec("megatron_opd.stages.grpo:GRPOStage", check_grpo, "group-relative policy optimisation (DeepSeek-V3.2)"),
    "grm": StageSpec("megatron_opd.stages.grm:GRMStage", check_grm,
                     "GRPO with a generative reward model's verdicts; judge RL on annotations"),
    "grm_sft": StageSpec("megatron_opd.stages.grm:GRMSFTStage", check_grm_sft,
                         "the GRM's cold start: SFT on the rubric task and the annotations' verdicts"),
    "grm_rm": StageSpec("megatron_opd.stages.grm:ScalarRMStage", check_grm_rm,
                        "the scalar reward model the GRM replaces: a regression head fit to the annotations"),
}


def implemented() -> list[str]:
    return [name for name, spec in STAGES.items() if spec is not None]


def stage_spec(name: str) -> StageSpec:
    """The registry entry of stage `name`; `ConfigError` for an unknown or unimplemented stage."""
    spec = STAGES.get(name)
    if spec is not None:
        return spec
    runnable = ", ".join(implemented())
    if name in STAGES:
        raise ConfigError(f"stage: {name!r} is not implemented yet; the stages that run are: {runnable}")
    close = difflib.get_close_matches(str(name), list(STAGES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"stage: {name!r} is not a stage; {hint}the stages that run are: {runnable}")
