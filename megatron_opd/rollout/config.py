"""`RolloutConfig` and `SamplingParams`: how a stage's trajectories are sampled, as the YAML says.

Torch-free on purpose: the config tree imports it (a SLURM login node renders jobs without torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from megatron_opd.runtime.secrets import LITERAL_KEY_REFUSED, SecretError, check_key_source, read_api_key


if TYPE_CHECKING:
    from megatron_opd.models.config import ModelConfig
    from megatron_opd.runtime.layout import ParallelLayout


class RolloutConfigError(ValueError):
    """A rollout or sampling key is out of range; the message names the dotted key."""


def sampling_problems(values: "SamplingParams | RolloutConfig", prefix: str = "") -> list[str]:
    """What a sampler cannot use (it used to fail deep inside it, or do nothing), read from the
    sampling fields that `SamplingParams` and `RolloutConfig` share; `prefix` makes dotted keys."""
    out = []
    if values.max_new_tokens < 0:
        out.append(f"{prefix}max_new_tokens must be >= 0, got {values.max_new_tokens}")
    if not values.temperature >= 0 or values.temperature == float("inf"):
        out.append(f"{prefix}temperature must be a finite number >= 0 (0: greedy), got {values.temperature}")
    if not 0.0 < values.top_p <= 1.0:
        out.append(f"{prefix}top_p must be in (0, 1] (1: no nucleus cut), got {values.top_p}")
    if values.top_k < 0:
        out.append(f"{prefix}top_k must be >= 0 (0: no limit), got {values.top_k}")
    if not 0.0 <= values.min_p <= 1.0:
        out.append(f"{prefix}min_p must be in [0, 1] (0: off), got {values.min_p}")
    return out


@dataclass(frozen=True)
class SamplingParams:
    """What the one sampler (rollout/sampler.py) does at each new token, with SGLang's meaning."""

    max_new_tokens: int = 8
    temperature: float = 1.0  # below 1e-6: greedy (SGLang turns it into top_k=1 at temperature 1)
    top_p: float = 1.0  # keep a token while the probability mass before it is <= top_p
    top_k: int = 0  # 0: no limit (SGLang's -1); 1: greedy
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the top one's
    stop_token_ids: tuple[int, ...] = ()  # finish after sampling one of these (EOS is the engine's)

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        problems = sampling_problems(self)
        if problems:
            raise RolloutConfigError("sampling parameters: " + "; ".join(problems))


@dataclass
class RolloutConfig:
    engine: Literal["embedded", "sglang"] = "embedded"
    # SGLang engine: server base URLs (a router's URL, or several servers used round-robin).
    endpoints: list[str] = field(default_factory=list)
    # The servers' key: an environment variable's name, or a file, holding it (never the key).
    api_key_env: str = ""
    api_key_file: str = ""
    timeout_s: float = 300.0  # per HTTP request to a rollout server (a weight update included)
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # Embedded engine: megatron-core's static KV cache, O(length) forward tokens per response
    # instead of O(length^2); false re-runs every prefix (the reference path; both sample the same
    # tokens under the same seed). Held-out evaluation calls the same `generate` with the cache.
    kv_cache: bool = True
    # Keep sampling mask (GRPO; notes/opd-math.md section 5): when the sampling truncates (top_p < 1,
    # top_k > 0 or min_p > 0), record the kept token set of every response position
    # (`Trajectories.kept_ids`); the SGLang engine asks the servers for it (SGLang's
    # `return_sampling_mask`, which needs a finite top_k: rollout.top_k=0 is sent as the vocabulary
    # size). false: never, e.g. OPD over servers that cannot return them.
    keep_sampling_mask: bool = True
    # Keep routing (MoE students): record the experts every MoE layer chose for every token while
    # sampling (`Trajectories.routed_experts`) and replay them in the training forwards
    # (models/routing.py, megatron-core's RouterReplay). The SGLang engine asks for them
    # (`return_routed_experts`; SGLang servers need --enable-return-routed-experts).
    keep_routing: bool = False
    # SGLang engine: "disk" exports weights and calls /update_weights_from_disk; "distributed"
    # broadcasts them under their Hugging Face names from trainer rank 0 through a process group
    # joining it and the servers (/init_weights_update_group, /begin_weight_update,
    # /update_weights_from_distributed, /end_weight_update): NCCL on GPUs, gloo on CPUs.
    weight_sync: Literal["disk", "distributed"] = "disk"
    # Distributed sync: ranks per server in the group (its --tp-size) and the address servers
    # reach trainer rank 0 at ("": 127.0.0.1 when every endpoint is local, else this host's name).
    server_ranks: int = 1
    weight_sync_address: str = ""
    # What "disk" sync writes for the servers: our megatron dist checkpoint (our embedded server
    # loads it) or a Hugging Face export (stock SGLang loads that).
    weight_format: Literal["megatron", "hf"] = "megatron"
    sync_every: int = 1

    REFUSED_KEYS: ClassVar[dict[str, str]] = {"api_key": LITERAL_KEY_REFUSED}

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.min_p)

    @property
    def api_key(self) -> str:
        """The key, read now from $api_key_env or api_key_file ("" when neither is set)."""
        return read_api_key(self.api_key_env, self.api_key_file, prefix="rollout.")

    def check(
        self, *, endpoints_required: bool = True, model: "ModelConfig | None" = None, layout: "ParallelLayout | None" = None
    ) -> None:
        """Raise `RolloutConfigError` for the first bad key. `endpoints_required=False`: a launcher
        starts the rollout servers and fills in `endpoints` itself. `model` and `layout` (when
        given) are what keep_routing is checked against."""
        # Not through `sampling`: its constructor would refuse the values without the dotted keys.
        problems = sampling_problems(self, "rollout.")
        if self.max_new_tokens < 1:
            problems.append(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for key in ("kv_cache", "keep_sampling_mask", "keep_routing"):
            if not isinstance(getattr(self, key), bool):  # a string "false" would be truthy
                problems.append(f"rollout.{key} must be true or false, got {getattr(self, key)!r}")
        if self.keep_routing is True:
            problems += keep_routing_problems(model, layout)
        if problems:
            raise RolloutConfigError("; ".join(problems))
        if self.timeout_s <= 0:
            raise RolloutConfigError(f"rollout.timeout_s must be > 0 (seconds per request), got {self.timeout_s}")
        if self.sync_every < 1:
            raise RolloutConfigError(f"rollout.sync_every must be >= 1 (steps between weight syncs), got {self.sync_every}")
        if self.engine != "sglang":
            return
        if not self.endpoints and endpoints_required:
            raise RolloutConfigError(
                "rollout.engine=sglang needs rollout.endpoints (the SGLang servers' base URLs), or rollout.engine=embedded"
            )
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")):
                raise RolloutConfigError(f"rollout.endpoints: {url!r} is not an http(s) URL")
        if self.server_ranks < 1:
            raise RolloutConfigError(f"rollout.server_ranks={self.server_ranks}: each server holds at least one rank")
        try:
            check_key_source(self.api_key_env, self.api_key_file, prefix="rollout.")
        except SecretError as e:
            raise RolloutConfigError(str(e)) from None


def keep_routing_problems(model: "ModelConfig | None", layout: "ParallelLayout | None") -> list[str]:
    """Why rollout.keep_routing=true cannot work for this model and layout (none when unknown)."""
    out = []
    if model is not None and not model.is_moe:
        out.append(
            "rollout.keep_routing=true replays MoE routing, but model.num_experts=0 (a dense model has no "
            "routers): set rollout.keep_routing=false, or train an MoE model"
        )
    if layout is not None and layout.cp > 1:
        out.append(
            f"rollout.keep_routing=true with parallel.cp={layout.cp}: replaying routes under context "
            "parallelism is not supported; use parallel.cp=1"
        )
    return out
