"""`JobConfig`: the typed tree of one job, its own sections, and `check()`, run before anything launches.

The tree gathers the sections each package owns (`ParallelLayout`, `ModelConfig`,
`TeacherConfig`, `RolloutConfig`, `ClusterConfig`, all torch-free) with the sections of the
training loop and the stages, which live here. `check()` runs every check that needs no ranks:
ranges of single values, the layout against the world and the model, the batch against the
data-parallel size, and the stage's own keys through the stage registry (config/stages.py). The
CLI runs it before a rank starts (`train`, `run`, and `submit` on a login node), and every rank
runs it again before it builds anything, so no path reaches a constructor with a config that a
check could have refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from megatron_opd.config.stages import CheckContext, stage_spec
from megatron_opd.config.typed import ConfigError
from megatron_opd.data.rubric import JUDGE_DOMAIN, JUDGE_TEMPLATE, TASK_DOMAIN
from megatron_opd.models.config import ModelConfig
from megatron_opd.models.hf.config_json import check_model_agrees, is_hf_model_dir
from megatron_opd.rollout.config import RolloutConfig
from megatron_opd.runtime.cluster import ClusterConfig
from megatron_opd.runtime.layout import ParallelLayout
from megatron_opd.teachers.config import TeacherConfig

# ---------------------------------------------------------------------------------------------
# Sections of the loop and the stages


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 1234
    # Ranks to start on this machine when not launched by torchrun/SLURM (1: this process only).
    nproc: int = 1
    log_every: int = 10
    # Progress display: "bar" (rich, on a terminal), "lines" (periodic log lines), "none".
    progress: Literal["auto", "bar", "lines", "none"] = "auto"

    def check(self) -> None:
        if not self.name:
            raise ConfigError("run.name is empty; name the run (its directory is run.output_dir/run.name)")
        _at_least(self, "run", nproc=1, log_every=1)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def check(self) -> None:
        _at_least(self, "train.optim", lr=0, min_lr=0, warmup_steps=0, weight_decay=0, clip_grad=0)
        if self.min_lr > self.lr:
            raise ConfigError(f"train.optim.min_lr={self.min_lr} is above train.optim.lr={self.lr}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"train.optim.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"train.optim.adam_eps must be > 0, got {self.adam_eps}")


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 8
    # Sequences per optimizer step over all data-parallel replicas.
    global_batch_size: int = 32
    precision: Literal["fp32", "bf16"] = "fp32"
    use_distributed_optimizer: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Checkpoint every N steps (0: only at the end); resume from the newest complete one.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2  # 0: keep every checkpoint
    # Continue from the newest complete checkpoint of the run. false refuses a run directory that
    # holds checkpoints; restart=true moves the old run aside and starts at step 0, on every
    # attempt it is given to (megatron_opd/stages/run_dir.py, docs/architecture.md "Resume").
    resume: bool = True
    restart: bool = False
    # Initialise the model from this checkpoint directory (a step_* dir or a root holding them),
    # a model directory, or a Hugging Face model directory (config.json + safetensors: `model:`
    # must describe config.json, models/hf/config_json.py).
    init_from: str = ""
    # When the run reaches train.steps: release its final checkpoint as a Hugging Face directory
    # here (config.json, safetensors, tokenizer files, chat template), written beside and swapped
    # in when complete ("" = no export; a stopped run exports when a rerun finishes it).
    export_hf: str = ""
    eval_every: int = 0
    # Evaluate before the first step too (the "before" of a distillation report).
    eval_at_start: bool = True

    def check(self, dp: int | None) -> None:
        """`dp`: the data-parallel size of the world the job runs on (None: not known)."""
        _at_least(self, "train", steps=1, micro_batch_size=1, global_batch_size=1)
        _at_least(self, "train", checkpoint_every=0, keep_checkpoints=0, eval_every=0)
        self.optim.check()
        per_step = (dp or 1) * self.micro_batch_size
        if self.global_batch_size % per_step:
            fits = max(per_step, self.global_batch_size // per_step * per_step)
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by dp * "
                f"train.micro_batch_size = {dp or 1} * {self.micro_batch_size} = {per_step}; "
                f"set train.global_batch_size to a multiple of {per_step} (e.g. {fits})"
            )


# The tiny domains a job trains on when it names no dataset files.
DEFAULT_TINY_DOMAINS = ["add", "reverse", "sort"]
DATASET_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class DatasetConfig:
    """One prompt file of `data.datasets` (docs/data.md: row format, mixing, held-out rows)."""

    path: str = ""  # a .jsonl or .parquet file
    # The domain of its rows; a row's own `domain` field may name another domain of data.datasets.
    domain: str = ""
    # The reward (rewards/registry.py: math, code, exact, regex, the tiny ones) that verifies the
    # domain's responses; "" for data that is never verified (SFT conversations).
    verifier: str = ""
    weight: float = 1.0  # its share of the training samples: weight / the sum of the weights
    # Held-out rows, never trained on: a fraction of the file's rows, or the rows of another file.
    eval_fraction: float = 0.0
    eval_path: str = ""

    def check(self, where: str) -> None:
        for key in ("path", "eval_path"):
            value = getattr(self, key)
            if key == "path" and not value:
                raise ConfigError(f"{where}.path is empty; name a .jsonl or .parquet file")
            if value and not value.endswith(DATASET_SUFFIXES):
                raise ConfigError(f"{where}.{key}={value}: a dataset file ends in .jsonl or .parquet")
            if value and not Path(value).is_file():
                raise ConfigError(f"{where}.{key}={value} does not exist")
        if not self.domain:
            raise ConfigError(f"{where}.domain is empty; name the domain of its rows (per-domain metrics and teachers use it)")
        if not self.weight > 0:
            raise ConfigError(f"{where}.weight must be > 0, got {self.weight}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"{where}.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_path:
            raise ConfigError(f"{where} sets both eval_fraction and eval_path; hold out rows one way")


@dataclass
class DataConfig:
    # Tiny verifiable domains used for training (see megatron_opd.data.domains) when `datasets`
    # is empty; with datasets, the domains are theirs.
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_TINY_DOMAINS))
    # Prompt files mixed by weight (data/datasets.py); empty: the tiny domains.
    datasets: list[DatasetConfig] = field(default_factory=list)
    # A bad row (undecodable, a missing or malformed field, over-long): "error" stops with its
    # file and line before any step; "drop" leaves it out and reports the count (data/dropped_rows).
    bad_rows: Literal["error", "drop"] = "error"
    # The tokenizer directory (Hugging Face files, or a model directory) of a model trained from
    # scratch; "" the run's own, else train.init_from's, else the character tokenizer.
    tokenizer: str = ""
    eval_size: int = 200  # held-out prompts per domain (at most)
    seed: int = 0
    # The GRM's domains (data/rubric.py): "rubric" (the task) and "judge" (the judge template over
    # this annotation file, JSON lines), and the judge template.
    annotations: str = ""
    judge_template: str = JUDGE_TEMPLATE
    # A JSONL of {"index", "domain", "prompt", "response"}: SFT trains on these responses for the
    # prompts at those indices instead of the rule's answers (the recipe's mixed SFT on the experts'
    # own samples, launchers/recipe.py). "" = the rule's answers.
    samples: str = ""

    @property
    def source_domains(self) -> list[str]:
        """The domains the job's prompts come from, in order: the datasets', else `domains`."""
        if self.datasets:
            return list(dict.fromkeys(d.domain for d in self.datasets))
        return list(self.domains)

    def verifier_of(self) -> dict[str, str]:
        """domain -> verifier name of the datasets (a domain has one verifier)."""
        return {d.domain: d.verifier for d in self.datasets}

    def check(self) -> None:
        if not self.domains:
            raise ConfigError("data.domains is empty; list the domains to train on, e.g. data.domains=[add,sort]")
        twice = sorted({d for d in self.domains if self.domains.count(d) > 1})
        if twice:
            raise ConfigError(f"data.domains lists {twice} more than once")
        _at_least(self, "data", eval_size=0)
        grm = [d for d in self.domains if d in GRM_DOMAINS]
        if grm and len(grm) != len(self.domains):
            raise ConfigError(f"data.domains={self.domains} mixes the GRM's domains {list(GRM_DOMAINS)} with others; "
                              f"a job trains on one or the other")  # fmt: skip
        if "judge" in self.domains and not self.annotations:
            raise ConfigError("data.domains lists 'judge' but data.annotations is empty; name the annotation file")
        if self.samples and not Path(self.samples).is_file():
            raise ConfigError(f"data.samples={self.samples} is not a file; point it at a JSONL of samples, or unset it")
        if self.samples and self.datasets:
            raise ConfigError("data.samples answers the tiny domains' prompts; it cannot be combined with data.datasets")
        if self.tokenizer and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"data.tokenizer={self.tokenizer} is not a directory")
        if not self.datasets:
            return
        if self.domains != DEFAULT_TINY_DOMAINS and self.domains != self.source_domains:
            raise ConfigError(
                f"data.domains={self.domains} names tiny domains, but data.datasets is set: the domains are the "
                f"datasets' ({self.source_domains}); drop data.domains"
            )
        verifier: dict[str, tuple[int, str]] = {}
        for i, d in enumerate(self.datasets):
            d.check(f"data.datasets[{i}]")
            if d.domain in verifier and verifier[d.domain][1] != d.verifier:
                j, other = verifier[d.domain]
                raise ConfigError(
                    f"data.datasets[{i}].verifier={d.verifier!r} but data.datasets[{j}] gives domain {d.domain!r} "
                    f"the verifier {other!r}; a domain has one verifier"
                )
            verifier.setdefault(d.domain, (i, d.verifier))


@dataclass
class OPDConfig:
    # Compute the full-vocabulary KL of hidden-signal teachers from hidden states and both
    # output layers in token chunks (O(chunk x V/TP) memory) instead of from materialised logits.
    fused_output_layer: bool = False
    fused_chunk_size: int = 1024
    # Keep every step's teacher signals in a zarr TeacherStore at this path ("" = off). A
    # restarted run reads the signals of the steps it redoes from it instead of scoring again.
    signal_store: str = ""
    # In-job teachers (teachers.<name>.placement: in_job; teachers/in_job.py): how many are on the
    # device at once, where their weights come from (disk: the model directory, read again when
    # needed; host: read once at start into host memory, pinned on GPUs), and whether the next
    # teacher's weights are read by a background thread while the current one runs.
    resident_teachers: int = 1
    teacher_weights: Literal["disk", "host"] = "disk"
    prefetch_teachers: bool = True


@dataclass
class GRPOConfig:
    """GRPO as DeepSeek-V3.2 runs it (stages/grpo.py; notes/opd-math.md section 5)."""

    # Samples per prompt; a rollout holds train.global_batch_size x updates_per_batch trajectories.
    group_size: int = 8
    # Optimizer updates per rollout batch, each on the next train.global_batch_size of its
    # trajectories: the first is on-policy, the later ones are off-policy (ratios != 1).
    updates_per_batch: int = 1
    advantage_scale: Literal["none", "std"] = "none"  # none: R - mean (V3.2); std: / std (GRPO)
    aggregation: Literal["token", "sequence"] = "token"  # token: DAPO; sequence: 1/|o_i| (V3.2 eq. 5)
    eps_low: float = 0.2  # clip range [1 - eps_low, 1 + eps_high]; eps_high > eps_low: clip-higher
    eps_high: float = 0.2
    # Weight of V3.2's unbiased KL to a frozen reference; 0 loads no reference model at all.
    kl_coef: float = 0.0
    # The reference's weights: a checkpoint (a step_* dir or a root holding them); "" means
    # train.init_from (the warm start the run began from). Needed when kl_coef > 0.
    reference: str = ""
    # Off-policy sequence masking (V3.2 eqs. 8-9): drop the policy term of a sequence with A < 0
    # whose mean log(pi_old / pi_theta) exceeds this; null turns it off.
    opsm_delta: float | None = None
    # Renormalise pi_theta and pi_ref over the sampler's kept sets (top-p/top-k/min-p) so both
    # sides of the ratio act on the truncated distribution the tokens were drawn from.
    keep_sampling_mask: bool = True
    # Dynamic sampling (DAPO): drop groups whose rewards are all equal (no advantage, no signal)
    # and refill from further prompts, at most `refill_rounds` times per rollout; rollout k then
    # reads prompt batches k (1 + refill_rounds) ... k (1 + refill_rounds) + refill_rounds.
    dynamic_sampling: bool = False
    refill_rounds: int = 2


GRM_DOMAINS = (TASK_DOMAIN, JUDGE_DOMAIN)
# The policies the GRM report compares (launchers/grm.py): GRPO with the actor judging itself
# (live weights), with a frozen snapshot of the cold-start judge, with the scalar reward model,
# with the hidden oracle, and no RL (the cold start).
GRM_POLICIES = ("grm", "grm_frozen", "scalar_rm", "oracle", "none")


@dataclass
class GRMConfig:
    """The generative reward model (stages/grm.py, rewards/grm.py; issue 14)."""

    # Who writes the policy's verdicts: the live weights ("live": the actor is the judge), a
    # frozen snapshot of them ("frozen": judge_weights, "" = train.init_from), or a judge server
    # ("http": judge_url, SGLang's /generate).
    judge: Literal["live", "frozen", "http"] = "live"
    judge_weights: str = ""
    judge_url: str = ""
    votes: int = 1  # k sampled verdicts per response, rubric order shuffled after the first
    judge_temperature: float = 1.0
    item_weight: float = 0.5  # judge RL: per-criterion agreement vs score distance
    judge_format_reward: float = -1.0  # judge RL: a verdict that does not parse
    policy_format_reward: float = 0.0  # policy: a response no vote parses for
    # The annotation set `megatron-opd run` makes (B labelled samples of the start policy).
    annotations_size: int = 100
    annotator_noise: float = 0.1
    # The policy's reward on the rubric task: the judge's voted verdicts ("judge"), a scalar
    # reward model (stage grm_rm) on the same backbone trained on the same annotations
    # ("scalar_rm": reward_model, its run directory), or the hidden oracle ("oracle": the
    # report's upper bound, the only training run that reads it).
    policy_reward: Literal["judge", "scalar_rm", "oracle"] = "judge"
    reward_model: str = ""
    # `megatron-opd run` of a grm config (launchers/grm.py): the report's phases, per seed.
    seeds: list[int] = field(default_factory=lambda: [1234])
    compare: list[str] = field(default_factory=lambda: list(GRM_POLICIES))
    cold_start_overrides: list[str] = field(default_factory=list)  # stage grm_sft, from random weights
    judge_rl_overrides: list[str] = field(default_factory=list)  # judge RL from the cold start: the start policy
    reward_model_overrides: list[str] = field(default_factory=list)  # stage grm_rm, from the cold start
    eval_samples: int = 16  # samples per held-out prompt (data.eval_size prompts; best-of-N up to this N)
    eval_votes: list[int] = field(default_factory=lambda: [1, 4])

    def check(self) -> None:
        _at_least(self, "grm", votes=1, annotations_size=1, judge_temperature=0.0, eval_samples=1)
        if self.policy_reward == "scalar_rm" and not self.reward_model:
            raise ConfigError("grm.policy_reward=scalar_rm needs grm.reward_model (the run directory of a grm_rm run)")
        unknown = sorted(set(self.compare) - set(GRM_POLICIES))
        if unknown or not self.compare or len(set(self.compare)) != len(self.compare):
            raise ConfigError(f"grm.compare={self.compare} must list distinct policies from {list(GRM_POLICIES)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"grm.seeds={self.seeds} must list distinct seeds (at least one)")
        if not self.eval_votes or any(k < 1 for k in self.eval_votes):
            raise ConfigError(f"grm.eval_votes={self.eval_votes} must list vote counts k >= 1")
        if not 0.0 <= self.item_weight <= 1.0:
            raise ConfigError(f"grm.item_weight={self.item_weight} must be in [0, 1]")
        if not 0.0 <= self.annotator_noise < 0.5:
            raise ConfigError(f"grm.annotator_noise={self.annotator_noise} must be in [0, 0.5)")
        if self.judge == "http" and not self.judge_url:
            raise ConfigError("grm.judge=http needs grm.judge_url (the judge server, e.g. http://127.0.0.1:30000)")
        if self.votes > 1 and self.judge_temperature == 0:
            raise ConfigError(f"grm.votes={self.votes} with grm.judge_temperature=0: every vote is the same verdict; "
                              f"set grm.judge_temperature > 0 or grm.votes=1")  # fmt: skip


@dataclass
class PipelineConfig:
    """How `megatron-opd run` prepares what the OPD stage needs (launchers/local.py)."""

    # Overrides for the SFT job that trains each expert whose model directory has no checkpoint,
    # then per teacher name (a harder domain may need more steps).
    expert_overrides: list[str] = field(default_factory=list)
    expert_overrides_by_teacher: dict[str, list[str]] = field(default_factory=dict)
    # Overrides for the GRPO job that continues each expert from its SFT run (stage grpo on the
    # expert's own domains), then per teacher name. A teacher whose two lists are both empty gets
    # no RL: its SFT run is the expert. With RL, the SFT run is `<expert dir>-sft` and the GRPO
    # run is the expert directory that is served.
    expert_rl_overrides: list[str] = field(default_factory=list)
    expert_rl_overrides_by_teacher: dict[str, list[str]] = field(default_factory=dict)
    # Overrides for a mixed SFT warm start of the student ([]: none).
    student_overrides: list[str] = field(default_factory=list)
    parallel_jobs: int = 1  # SFT jobs (experts, student warm start) run at once
    replicas: int = 1  # embedded teacher servers per expert
    router: bool = True  # put the real sglang-router in front of replicas > 1

    def check(self, teachers: dict[str, TeacherConfig]) -> None:
        _at_least(self, "pipeline", parallel_jobs=1, replicas=1)
        for key in ("expert_overrides_by_teacher", "expert_rl_overrides_by_teacher"):
            unknown = sorted(set(getattr(self, key)) - set(teachers))
            if unknown:
                raise ConfigError(
                    f"pipeline.{key} names {unknown}, which are not teachers (teachers: {sorted(teachers)})"
                )

    def rl_overrides(self, teacher: str) -> list[str]:
        """The GRPO job's overrides for `teacher`'s expert ([]: no RL, SFT only)."""
        return self.expert_rl_overrides + self.expert_rl_overrides_by_teacher.get(teacher, [])


RECIPE_METHODS = ("opd_hidden", "opd_topk", "opd_sampled", "mixed_rl", "mixed_sft", "uniform", "task_arithmetic", "ties")


@dataclass
class RecipeConfig:
    """The experiment `megatron-opd run` drives when `recipe.methods` is not empty
    (launchers/recipe.py): one shared base, every expert fine-tuned from it, then each method from
    the base with the same budget, evaluated on every domain's held-out set, per seed."""

    # Which methods to compare (RECIPE_METHODS); [] = not a recipe, the plain distillation pipeline.
    methods: list[str] = field(default_factory=list)
    # run.seed of each repetition; every phase (base, experts, methods) is repeated per seed.
    seeds: list[int] = field(default_factory=lambda: [1234])
    # The shared base: SFT on every domain (a generic mixture) from random weights. Each expert is
    # then fine-tuned from it as `megatron-opd run` trains experts: SFT (pipeline.expert_overrides),
    # then GRPO where pipeline.expert_rl_overrides (and _by_teacher) say.
    base_overrides: list[str] = field(default_factory=list)
    # The budget: applied to every trained method (the same steps and samples for each).
    budget_overrides: list[str] = field(default_factory=list)
    # Per method, after the budget (e.g. a topk for opd_topk, grpo.* for mixed_rl); they may not
    # change train.steps or train.global_batch_size (the budget).
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    ties_density: float = 0.2
    ties_lambda: float = 1.0
    task_arithmetic_scale: float = 1.0
    topk: int = 8  # k of opd_topk
    # Where opd_hidden's teachers run: inside the trainer (in_job: teachers/in_job.py, no servers)
    # or as one server each. The signal is the same (the in-job path equals the served one); the
    # sampled and top-k signals always come from servers (in-job teachers give hidden states).
    hidden_placement: Literal["in_job", "server"] = "in_job"
    # Run only this phase ("seed<S>/base", "seed<S>/experts/<name>/sft", "seed<S>/methods/<m>",
    # "seed<S>/report", or "report": the table over every seed): one job of the SLURM chain.
    only: str = ""

    def check(self) -> None:
        unknown = sorted(set(self.methods) - set(RECIPE_METHODS))
        if unknown:
            raise ConfigError(f"recipe.methods names {unknown}; the methods are {list(RECIPE_METHODS)}")
        stray = sorted(set(self.method_overrides) - set(self.methods))
        if stray:
            raise ConfigError(f"recipe.method_overrides names {stray}, which are not in recipe.methods {self.methods}")
        for method, overrides in self.method_overrides.items():
            for o in overrides:
                if o.split("=", 1)[0].strip() in ("train.steps", "train.global_batch_size"):
                    raise ConfigError(
                        f"recipe.method_overrides.{method} sets {o.split('=', 1)[0]}: every method has the same "
                        f"budget; set it in recipe.budget_overrides"
                    )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"recipe.seeds must list distinct seeds, got {self.seeds}")
        if not 0 < self.ties_density <= 1:
            raise ConfigError(f"recipe.ties_density must lie in (0, 1], got {self.ties_density}")
        _at_least(self, "recipe", topk=1)
def check_init_from(cfg: "JobConfig") -> None:
    """A Hugging Face `train.init_from` must be the model `model:` describes (read where the
    directory is reachable: a login node may not see the cluster's file systems; every rank
    checks again before it builds the model)."""
    if cfg.train.init_from and is_hf_model_dir(cfg.train.init_from):
        check_model_agrees(cfg.model, cfg.train.init_from, "train.init_from")


def check_export_hf(cfg: "JobConfig") -> None:
    """The release directory is a new directory of its own: not the run's, not an input's."""
    out = cfg.train.export_hf
    if not out:
        return
    target = Path(out).resolve()
    inputs = {"the run directory (run.output_dir/run.name)": cfg.run_dir, "train.init_from": cfg.train.init_from}
    inputs.update({f"teachers.{n}.model_dir": t.model_dir for n, t in cfg.teachers.items()})
    for key, given in inputs.items():
        if not given:
            continue
        source = Path(given).resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise ConfigError(
                f"train.export_hf={out} overlaps {key} ({given}): the export would be written into or "
                f"over it; choose a directory outside it (e.g. {Path(cfg.run.output_dir) / (cfg.run.name + '-hf')})"
            )
    if target.is_file():
        raise ConfigError(f"train.export_hf={out} is a file; name a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / "manifest.json").is_file():
        # A release replaces an earlier release (an export writes manifest.json), nothing else.
        raise ConfigError(
            f"train.export_hf={out} exists, is not empty and is not a release (no manifest.json): the "
            f"export would replace it; name a new or empty directory"
        )


def _at_least(section, prefix: str, **minimum: float) -> None:
    for key, low in minimum.items():
        value = getattr(section, key)
        if value < low:
            raise ConfigError(f"{prefix}.{key} must be >= {low}, got {value}")


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class JobConfig:
    # A stage of the registry (config/stages.py); an unknown or planned one is refused here.
    stage: str = "sft"
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    grm: GRMConfig = field(default_factory=GRMConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)  # launchers/recipe.py
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # SLURM jobs (launchers/slurm.py)

    def __post_init__(self):
        stage_spec(self.stage)  # refuses an unknown or unimplemented stage at load time

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def problems(
        self,
        world_size: int | None = None,
        *,
        endpoints_from_launcher: bool = False,
        by_pipeline: bool = False,
    ) -> list[str]:
        """Every check that needs no ranks; the first problem of each section, each naming its key.

        `world_size`: the ranks the job runs on (default `run.nproc`). A launcher that starts
        the servers fills in `teachers.*.endpoints` and `rollout.endpoints` itself
        (`endpoints_from_launcher`: `submit`); `megatron-opd run` (`by_pipeline`) also trains the
        experts into model directories of its choosing, and reads the pipeline: section. Empty
        values are fine then.
        """
        world = world_size if world_size is not None else self.run.nproc
        found: list[str] = []

        def collect(check: Callable[..., object], *args, **kwargs):
            try:
                return check(*args, **kwargs)
            except ValueError as e:  # ConfigError, LayoutError, TeacherConfigError, ...
                found.append(str(e))
                return None

        collect(self.run.check)
        layout = collect(self.parallel.resolve, world) if world >= 1 else None
        collect(self.model.check, layout or self.parallel)
        collect(self.train.check, layout.dp if layout else None)
        collect(check_init_from, self)
        collect(check_export_hf, self)
        collect(self.data.check)
        ctx = CheckContext(world, layout, endpoints_from_launcher, by_pipeline)
        for problem in stage_spec(self.stage).check(self, ctx):
            found.append(problem)
        return found

    def check(
        self,
        world_size: int | None = None,
        *,
        endpoints_from_launcher: bool = False,
        by_pipeline: bool = False,
    ) -> None:
        """Raise `ConfigError` with what `problems()` finds (one line for one problem, else one per line)."""
        found = self.problems(world_size, endpoints_from_launcher=endpoints_from_launcher, by_pipeline=by_pipeline)
        if len(found) == 1:
            raise ConfigError(found[0])
        if found:
            raise ConfigError(f"{len(found)} problems in the config:\n  - " + "\n  - ".join(found))
