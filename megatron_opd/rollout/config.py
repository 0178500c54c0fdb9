"""`RolloutConfig` and `SamplingParams`: how a stage's trajectories are sampled, as the YAML says.

Torch-free on purpose: the config tree imports it (a SLURM login node renders jobs without torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if problems:
            raise ValueError("sampling parameters: " + "; ".join(problems))


@dataclass
class RolloutConfig:
    engine: Literal["embedded", "sglang"] = "embedded"
    # SGLang engine: server base URLs (a router's URL, or several servers used round-robin).
    endpoints: list[str] = field(default_factory=list)
    api_key: str = ""
    timeout_s: float = 300.0  # per HTTP request to a rollout server (a weight update included)
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
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

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.min_p)
