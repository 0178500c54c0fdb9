"""`TeacherClient`: the async HTTP client for one teacher and its replicas.

One aiohttp session per teacher (pooled keep-alive connections), at most `max_concurrency`
requests in flight, sequences batched `batch_size` per /generate request (grouped by prompt
length: one scalar `logprob_start_len` per request is what the sglang-router accepts).

Failure handling, in order:
- connection errors, timeouts, truncated bodies and HTTP 408/429/5xx are retried, first on the
  other replicas (a failed replica is avoided for a cool-down), then, once every replica has
  failed, after an exponential back-off; `max_retries` bounds the extra attempts;
- any other HTTP status is the server refusing the request: `TeacherRequestError`, not retried;
- a 200 whose content does not match the request (row counts, token ids, finish reasons) is a
  `ProtocolError`, not retried: a misaligned signal must never reach the loss.
Every error names the teacher, the URL and the numbers.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import aiohttp

from megatron_opd.teachers import protocol as P
from megatron_opd.teachers.config import TeacherConfig

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class TeacherError(RuntimeError):
    """Base of the client's errors."""


class TeacherUnavailable(TeacherError):
    """No replica answered (after retries), or a replica is down when the pool starts."""


class TeacherRequestError(TeacherError):
    """A server refused a request (HTTP 4xx other than 408/429); the message is the server's."""


class ReplicaFailed(TeacherUnavailable):
    """One replica failed in a way worth retrying elsewhere (connection, timeout, 408/429/5xx)."""


@dataclass
class ClientStats:
    requests: int = 0  # HTTP requests that got a 200
    attempts: int = 0  # all HTTP attempts, failed ones included
    failovers: int = 0  # attempts that moved to another replica after a failure
    bytes_sent: int = 0
    bytes_received: int = 0  # bodies of 200 responses
    seconds: float = 0.0  # wall time of successful requests


@dataclass
class TraceEntry:
    url: str
    path: str
    request: dict | None
    status: int
    content_type: str
    body: bytes


async def gather_all(coros: Sequence[Awaitable]) -> list:
    """Like asyncio.gather, but the first failure cancels the rest before it propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TeacherClient:
    """Talks to one teacher (`cfg.endpoints` are its replicas or a router). Use inside one loop."""

    def __init__(self, name: str, cfg: TeacherConfig, *, vocab_size: int = 0, trace: bool = False):
        self.name, self.cfg, self.vocab_size = name, cfg, vocab_size
        self.stats = ClientStats()
        self.trace: list[TraceEntry] | None = [] if trace else None
        self.model_infos: dict[str, dict] = {}  # url -> /model_info, filled by start()
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._next = 0
        self._down_until: dict[str, float] = {}
        self._cooldown_s = max(1.0, 4 * cfg.retry_backoff_s)

    # -- lifecycle ----------------------------------------------------------------------------

    def _where(self, url: str) -> str:
        return f"teacher {self.name!r} at {url}"

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.cfg.max_concurrency),
            )
            self._sem = asyncio.Semaphore(self.cfg.max_concurrency)
        return self._session

    async def start(self, *, require_all: bool = True) -> dict[str, dict]:
        """Fetch /model_info from every replica (a down replica is an error when `require_all`)."""
        self._ensure_session()
        for url in self.cfg.endpoints:
            try:
                self.model_infos[url] = await self.model_info(url)
            except TeacherError:
                if require_all:
                    raise
        if not self.model_infos:
            raise TeacherUnavailable(f"teacher {self.name!r}: none of {self.cfg.endpoints} answered /model_info")
        return self.model_infos

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "TeacherClient":
        self._ensure_session()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- plain requests -----------------------------------------------------------------------

    async def get_json(self, url: str, path: str) -> Any:
        """GET one replica (no failover: used to inspect a specific server).

        An unreachable server fails at once; HTTP 408/429/5xx (a router whose chosen worker just
        died answers 500) are retried up to `max_retries` times with back-off.
        """
        session = self._ensure_session()
        for attempt in range(self.cfg.max_retries + 1):
            try:
                async with session.get(url + path) as resp:
                    body = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise TeacherUnavailable(f"{self._where(url)} is not reachable ({path}): {type(e).__name__}: {e}") from None
            if resp.status not in _RETRY_STATUS or attempt == self.cfg.max_retries:
                break
            await asyncio.sleep(min(self.cfg.retry_backoff_s * 2**attempt, 10.0))
        if resp.status != 200:
            error = TeacherUnavailable if resp.status in _RETRY_STATUS else TeacherRequestError
            raise error(f"{self._where(url)} answered {path} with HTTP {resp.status}: {P.error_message(body)}")
        try:
            return json.loads(body)
        except ValueError:
            raise P.ProtocolError(f"{self._where(url)} answered {path} with a body that is not JSON") from None

    async def model_info(self, url: str) -> dict:
        try:
            return await self.get_json(url, "/model_info")
        except TeacherRequestError as e:
            if "HTTP 404" not in str(e):
                raise
            return await self.get_json(url, "/get_model_info")  # older servers and routers

    # -- /generate with failover --------------------------------------------------------------

    def _pick(self, exclude: set[str]) -> str | None:
        """Round-robin over replicas, skipping `exclude` and preferring those not cooling down."""
        now = time.monotonic()
        n = len(self.cfg.endpoints)
        order = [self.cfg.endpoints[(self._next + i) % n] for i in range(n)]
        order = [u for u in order if u not in exclude]
        if not order:
            return None
        healthy = [u for u in order if self._down_until.get(u, 0.0) <= now]
        url = (healthy or order)[0]
        self._next = (self.cfg.endpoints.index(url) + 1) % n
        return url

    async def post_to(self, url: str, path: str, body: dict) -> tuple[bytes, str]:
        """One POST to one replica (no failover); retryable failures raise `ReplicaFailed`."""
        self._ensure_session()
        async with self._sem:
            return await self._send(url, path, body)

    async def _send(self, url: str, path: str, body: dict) -> tuple[bytes, str]:
        session = self._ensure_session()
        data = json.dumps(body).encode()
        self.stats.attempts += 1
        self.stats.bytes_sent += len(data)
        t0 = time.perf_counter()
        try:
            async with session.post(url + path, data=data, headers={"Content-Type": "application/json"}) as resp:
                payload = await resp.read()
                status, ctype = resp.status, resp.headers.get("Content-Type", "")
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ReplicaFailed(f"{self._where(url)}: {type(e).__name__}: {e}") from None
        if self.trace is not None:
            self.trace.append(TraceEntry(url, path, body, status, ctype, payload))
        if status in _RETRY_STATUS:
            raise ReplicaFailed(f"{self._where(url)}: HTTP {status}: {P.error_message(payload)[:300]}")
        if status != 200:
            raise TeacherRequestError(f"{self._where(url)} refused {path} with HTTP {status}: {P.error_message(payload)}")
        self.stats.requests += 1
        self.stats.bytes_received += len(payload)
        self.stats.seconds += time.perf_counter() - t0
        return payload, ctype

    async def post(self, path: str, make_body: Callable[[str], dict]) -> tuple[str, bytes, str]:
        """POST to some replica with failover; `make_body(url)` builds the body for that replica.

        Returns (url that answered, body, content type).
        """
        self._ensure_session()
        errors: list[str] = []
        failed: set[str] = set()
        rounds = 0
        for attempt in range(self.cfg.max_retries + 1):
            if len(failed) == len(self.cfg.endpoints):  # every replica failed since the last back-off
                await asyncio.sleep(min(self.cfg.retry_backoff_s * 2**rounds, 10.0))
                rounds += 1
                failed.clear()
            if attempt:
                self.stats.failovers += 1
            try:
                # Pick the replica once a slot is free, so the choice sees the latest failures.
                async with self._sem:
                    url = self._pick(failed)
                    payload, ctype = await self._send(url, path, make_body(url))
            except ReplicaFailed as e:
                errors.append(str(e))
                failed.add(url)
                self._down_until[url] = time.monotonic() + self._cooldown_s
                continue
            self._down_until.pop(url, None)
            return url, payload, ctype
        raise TeacherUnavailable(
            f"teacher {self.name!r}: {path} failed {len(errors)} times over {self.cfg.endpoints}; last errors: "
            + " | ".join(errors[-3:])
        )

    async def generate(self, body: dict) -> list[dict]:
        """A raw /generate (any SGLang body) with failover; returns the response objects."""
        sp = body.get("sampling_params")
        for params in sp if isinstance(sp, list) else [sp or {}]:
            P.check_sampling_params(params)
        url, payload, ctype = await self.post("/generate", lambda _url: body)
        return P.decode_response_body(payload, ctype, self._where(url))

    # -- scoring ------------------------------------------------------------------------------

    def binary_supported(self, url: str) -> bool:
        info = self.model_infos.get(url) or {}
        return self.cfg.wire == "auto" and int((info.get("opd_server") or {}).get("binary_signal", 0)) >= 1

    def spec(self, url: str | None = None) -> P.SignalSpec:
        return P.SignalSpec(
            kind=self.cfg.signal,
            topk=self.cfg.topk,
            topk_format=self.cfg.topk_format,
            binary=url is not None and self.binary_supported(url),
            hidden_dtype=self.cfg.hidden_dtype,
        )

    def batches(self, items: Sequence[P.ScoreItem]) -> list[list[int]]:
        """Indices of `items` in requests: equal prompt lengths together, `batch_size` at most."""
        by_len: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            by_len.setdefault(it.prompt_len, []).append(i)
        size = self.cfg.batch_size
        return [idx[j : j + size] for idx in by_len.values() for j in range(0, len(idx), size)]

    async def score(self, items: Sequence[P.ScoreItem]) -> list[P.ItemSignal]:
        """The teacher's signal for each item, in order (`cfg.signal`, aligned to response tokens)."""
        out: list[P.ItemSignal | None] = [None] * len(items)

        async def one(idx: list[int]) -> None:
            chunk = [items[i] for i in idx]
            url, payload, ctype = await self.post("/generate", lambda u: P.score_request(chunk, self.spec(u)))
            where = self._where(url)
            responses = P.decode_response_body(payload, ctype, where)
            for i, sig in zip(idx, P.parse_score_response(responses, chunk, self.spec(), where, vocab_size=self.vocab_size)):
                out[i] = sig

        await gather_all([one(idx) for idx in self.batches(items)])
        return out  # type: ignore[return-value]


__all__ = [
    "TeacherClient", "TeacherError", "TeacherUnavailable", "ReplicaFailed", "TeacherRequestError", "ClientStats", "TraceEntry", "gather_all",
]  # fmt: skip
