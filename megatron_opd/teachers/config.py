"""`TeacherConfig`: one teacher of a distillation job, as the job's YAML declares it.

Light on purpose (no torch, no aiohttp): the config tree imports it. `JobConfig.teachers` maps a
teacher name to one of these; `megatron_opd.config.build` checks every key and type.

    teachers:
      math:
        endpoints: [http://node12:30000, http://node13:30000]   # replicas, or one router URL
        domains: [add, sort]
        signal: topk
        topk: 32
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from megatron_opd.runtime.secrets import LITERAL_KEY_REFUSED, check_key_source, read_api_key

SIGNAL_KINDS = ("hidden", "topk", "sampled", "logits")
PLACEMENTS = ("server", "in_job")


class TeacherConfigError(ValueError):
    """A teacher's config is inconsistent; the message names the teacher and the key."""


@dataclass
class TeacherConfig:
    # Where the teacher runs. server: its own processes, reached over HTTP (endpoints; the
    # TeacherPool). in_job: a megatron model loaded from model_dir inside the training job under
    # the student's layout, on demand (teachers/in_job.py; opd.resident_teachers at a time).
    placement: Literal["server", "in_job"] = "server"
    # Base URLs of the teacher's replicas (each an SGLang server, our embedded server, or a router).
    endpoints: list[str] = field(default_factory=list)
    # Trajectory domains this teacher scores; every domain belongs to exactly one teacher.
    domains: list[str] = field(default_factory=list)
    # What the teacher sends per response token (docs/teachers.md, "Signal kinds").
    signal: Literal["hidden", "topk", "sampled", "logits"] = "hidden"
    topk: int = 0  # k for signal=topk
    # Distillation temperature. Servers return log_softmax of the raw logits (SGLang never applies
    # sampling temperature to input positions), so the trainer applies it, not the server.
    temperature: float = 1.0
    # The key sent as `Authorization: Bearer <key>`: the name of an environment variable holding
    # it, or a file holding it (never the key itself: configs are written back into every run).
    api_key_env: str = ""
    api_key_file: str = ""
    timeout_s: float = 120.0  # per HTTP request
    max_retries: int = 3  # further attempts after the first, spread over the replicas
    retry_backoff_s: float = 0.5  # first back-off after every replica failed once; doubles, capped
    max_concurrency: int = 8  # HTTP requests in flight to this teacher
    batch_size: int = 8  # sequences per /generate request (sequences of one prompt length)
    # The teacher's model directory: the trainer loads the output layer of hidden-signal teachers
    # from it; the embedded server loads the model from it.
    model_dir: str = ""
    # Wire format: "auto" uses our binary signal when the server advertises it, else JSON.
    wire: Literal["auto", "json"] = "auto"
    # Top-k encoding asked for; any encoding that comes back is decoded (older servers ignore the
    # flat flags and answer nested).
    topk_format: Literal["b64", "flat", "nested"] = "b64"
    # dtype of hidden states in our binary form (JSON always carries full floats).
    hidden_dtype: Literal["float32", "float16"] = "float32"
    # A real SGLang server does not report its tokenizer: name the directory of the tokenizer it
    # serves (the pool loads it and compares it with the student's, naming what differs), or
    # declare what the operator checked; the pool then probes the vocabulary (docs/teachers.md).
    tokenizer_dir: str = ""
    tokenizer_fingerprint: str = ""
    vocab_size: int = 0  # 0: the tokenizer_dir's

    REFUSED_KEYS: ClassVar[dict[str, str]] = {"api_key": LITERAL_KEY_REFUSED}

    @property
    def api_key(self) -> str:
        """The key, read now from $api_key_env or api_key_file ("" when neither is set)."""
        return read_api_key(self.api_key_env, self.api_key_file, prefix="a teacher's ")

    def check(self, name: str, *, endpoints_required: bool = True) -> None:
        """Raise `TeacherConfigError` for the first inconsistent key. `endpoints_required=False`:
        a launcher starts this teacher's servers and fills in `endpoints` itself."""
        where = f"teachers.{name}"
        if self.placement not in PLACEMENTS:
            raise TeacherConfigError(f"{where}.placement={self.placement!r}; expected one of {list(PLACEMENTS)}")
        if self.placement == "in_job":
            if self.endpoints:
                raise TeacherConfigError(
                    f"{where}.endpoints={self.endpoints} but {where}.placement is 'in_job': an in-job teacher "
                    f"runs inside the trainer; remove the endpoints or set {where}.placement=server"
                )
            if self.signal != "hidden":
                raise TeacherConfigError(
                    f"{where}.signal={self.signal!r} but {where}.placement is 'in_job': in-job teachers give "
                    f"their hidden states (the exact distribution through their head); set {where}.signal=hidden"
                )
        elif not self.endpoints and endpoints_required:
            raise TeacherConfigError(f"{where}.endpoints is empty; give at least one base URL")
        for url in self.endpoints:
            if not url.startswith(("http://", "https://")):
                raise TeacherConfigError(f"{where}.endpoints: {url!r} is not an http(s) URL")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise TeacherConfigError(f"{where}.endpoints lists a URL twice: {self.endpoints}")
        if not self.domains:
            raise TeacherConfigError(f"{where}.domains is empty; a teacher must score at least one domain")
        if self.signal not in SIGNAL_KINDS:
            raise TeacherConfigError(f"{where}.signal={self.signal!r}; expected one of {list(SIGNAL_KINDS)}")
        if self.signal == "topk" and self.topk < 1:
            raise TeacherConfigError(f"{where}.signal is 'topk' but {where}.topk={self.topk}; set k >= 1")
        if self.signal != "topk" and self.topk:
            raise TeacherConfigError(f"{where}.topk={self.topk} is set but {where}.signal is {self.signal!r}")
        if self.temperature <= 0:
            raise TeacherConfigError(f"{where}.temperature must be > 0, got {self.temperature}")
        for key in ("timeout_s", "max_concurrency", "batch_size"):
            if getattr(self, key) <= 0:
                raise TeacherConfigError(f"{where}.{key} must be > 0, got {getattr(self, key)}")
        if self.max_retries < 0 or self.retry_backoff_s < 0:
            raise TeacherConfigError(f"{where}.max_retries and retry_backoff_s must be >= 0")
        if self.tokenizer_dir and not Path(self.tokenizer_dir).is_dir():
            raise TeacherConfigError(f"{where}.tokenizer_dir={self.tokenizer_dir} is not a directory")
        if self.vocab_size < 0:
            raise TeacherConfigError(f"{where}.vocab_size must be >= 0 (0: not declared), got {self.vocab_size}")
        try:
            check_key_source(self.api_key_env, self.api_key_file, prefix=f"{where}.")
        except ValueError as e:
            raise TeacherConfigError(str(e)) from None


def check_teachers(teachers: dict[str, TeacherConfig], *, endpoints_required: bool = True) -> dict[str, str]:
    """Check every teacher and return domain -> teacher name (a domain claimed twice is an error)."""
    if not teachers:
        raise TeacherConfigError("no teachers configured (the teachers: section is empty)")
    owner: dict[str, str] = {}
    for name, cfg in teachers.items():
        cfg.check(name, endpoints_required=endpoints_required)
        for domain in cfg.domains:
            if domain in owner:
                raise TeacherConfigError(
                    f"domain {domain!r} is claimed by teachers {owner[domain]!r} and {name!r}; "
                    f"each domain must have exactly one teacher"
                )
            owner[domain] = name
    return owner
