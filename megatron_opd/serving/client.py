"""`SGLangClient`: the one async HTTP client for SGLang servers (and ours, and routers in front).

Used by the teacher pool (teachers/pool.py: scoring) and the SGLang rollout engine
(rollout/sglang.py: sampling and weight updates) alike. One client talks to one set of
replicas (`ClientSettings.endpoints`: servers, or one router URL): one aiohttp session with
pooled keep-alive connections, at most `max_concurrency` requests in flight.

Failure handling, in order:
- connection errors, timeouts, truncated bodies and HTTP 408/429/5xx are retried, first on the
  other replicas (a failed replica is avoided for a cool-down), then, once every replica has
  failed, after an exponential back-off; `max_retries` bounds the extra attempts. The first
  failure of a replica is logged once (not once per request), and again only after it answered;
- any other HTTP status is the server refusing the request: `RequestRefused` with the server's
  own message (an SGLang error body, or a weight-update reply's `message`), never retried;
- a weight-update reply `{"success": false, "message": ...}` is a refusal too, whatever its status.
Every error names the client's label (e.g. "teacher 'math'"), the URL and the numbers.

`EventLoopThread` runs a client on a private loop thread, so synchronous code (the trainer's
loop) can call it: `loop.run(client.generate(body))`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Sequence

import aiohttp

from megatron_opd.serving import wire

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """Base of the client's errors."""


class ServerUnavailable(ServerError):
    """No replica answered (after retries), or a replica is down when the client starts."""


class RequestRefused(ServerError):
    """A server refused a request (HTTP 4xx other than 408/429, or success=false); the message is the server's."""


class ReplicaFailed(ServerUnavailable):
    """One replica failed in a way worth retrying elsewhere (connection, timeout, 408/429/5xx)."""


@dataclass(frozen=True)
class ClientSettings:
    """Where the servers are and how hard to try."""

    endpoints: tuple[str, ...]  # base URLs of the replicas, or of one router
    api_key: str = ""  # sent as `Authorization: Bearer <key>` when set
    timeout_s: float = 120.0  # per HTTP request
    max_retries: int = 3  # further attempts after the first, spread over the replicas
    retry_backoff_s: float = 0.5  # first back-off after every replica failed once; doubles, capped
    max_concurrency: int = 8  # HTTP requests in flight

    def __post_init__(self):
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        if not self.endpoints:
            raise ValueError("an SGLang client needs at least one endpoint URL")


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


class EventLoopThread:
    """An asyncio loop on a daemon thread: `run(coro)` blocks, `submit(coro)` returns a future,
    `wrap(coro)` awaits from another loop."""

    def __init__(self, name: str = "sglang-client"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine) -> Any:
        return self.submit(coro).result()

    async def wrap(self, coro: Coroutine) -> Any:
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class SGLangClient:
    """Talks to one set of replicas (`settings.endpoints`). Use inside one event loop.

    `label` opens every message, e.g. "teacher 'math'" or "rollout server".
    """

    def __init__(self, label: str, settings: ClientSettings, *, trace: bool = False):
        self.label, self.settings = label, settings
        self.endpoints = list(settings.endpoints)
        self.stats = ClientStats()
        self.trace: list[TraceEntry] | None = [] if trace else None
        self.model_infos: dict[str, dict] = {}  # url -> /model_info, filled by start()
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._next = 0
        self._down_until: dict[str, float] = {}
        self._reported_down: set[str] = set()  # replicas whose failure was logged since they last answered
        self._cooldown_s = max(1.0, 4 * settings.retry_backoff_s)

    # -- lifecycle ----------------------------------------------------------------------------

    def where(self, url: str) -> str:
        return f"{self.label} at {url}"

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            s = self.settings
            headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=s.timeout_s),
                connector=aiohttp.TCPConnector(limit=s.max_concurrency),
            )
            self._sem = asyncio.Semaphore(s.max_concurrency)
        return self._session

    async def start(self, *, require_all: bool = True) -> dict[str, dict]:
        """Fetch /model_info from every replica (a down replica is an error when `require_all`)."""
        self._ensure_session()
        for url in self.endpoints:
            try:
                self.model_infos[url] = await self.model_info(url)
            except ServerError:
                if require_all:
                    raise
        if not self.model_infos:
            raise ServerUnavailable(f"{self.label}: none of {self.endpoints} answered /model_info")
        return self.model_infos

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "SGLangClient":
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
        s = self.settings
        for attempt in range(s.max_retries + 1):
            try:
                async with session.get(url + path) as resp:
                    body = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise ServerUnavailable(f"{self.where(url)} is not reachable ({path}): {type(e).__name__}: {e}") from None
            if resp.status not in _RETRY_STATUS or attempt == s.max_retries:
                break
            await asyncio.sleep(min(s.retry_backoff_s * 2**attempt, 10.0))
        if resp.status != 200:
            error = ServerUnavailable if resp.status in _RETRY_STATUS else RequestRefused
            raise error(f"{self.where(url)} answered {path} with HTTP {resp.status}: {wire.error_message(body)}")
        try:
            return json.loads(body)
        except ValueError:
            raise wire.ProtocolError(f"{self.where(url)} answered {path} with a body that is not JSON") from None

    async def tokenizer_description(self, url: str):
        """The TokenizerDescription our server at `url` serves (None from a server without the route)."""
        from megatron_opd.data.tokenizer import TokenizerDescription

        try:
            return TokenizerDescription.from_json(await self.get_json(url, wire.TOKENIZER_DESCRIPTION_PATH))
        except (RequestRefused, ValueError, wire.ProtocolError):
            return None

    async def model_info(self, url: str) -> dict:
        try:
            return await self.get_json(url, "/model_info")
        except RequestRefused as e:
            if "HTTP 404" not in str(e):
                raise
            return await self.get_json(url, "/get_model_info")  # older servers and routers

    # -- POST with failover -------------------------------------------------------------------

    def _pick(self, exclude: set[str]) -> str | None:
        """Round-robin over replicas, skipping `exclude` and preferring those not cooling down."""
        now = time.monotonic()
        n = len(self.endpoints)
        order = [self.endpoints[(self._next + i) % n] for i in range(n)]
        order = [u for u in order if u not in exclude]
        if not order:
            return None
        healthy = [u for u in order if self._down_until.get(u, 0.0) <= now]
        url = (healthy or order)[0]
        self._next = (self.endpoints.index(url) + 1) % n
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
            raise ReplicaFailed(f"{self.where(url)}: {type(e).__name__}: {e}") from None
        if self.trace is not None:
            self.trace.append(TraceEntry(url, path, body, status, ctype, payload))
        if status in _RETRY_STATUS:
            raise ReplicaFailed(f"{self.where(url)}: HTTP {status}: {wire.error_message(payload)[:300]}")
        if status != 200:
            raise RequestRefused(f"{self.where(url)} refused {path} with HTTP {status}: {wire.error_message(payload)}")
        self.stats.requests += 1
        self.stats.bytes_received += len(payload)
        self.stats.seconds += time.perf_counter() - t0
        return payload, ctype

    def _replica_failed(self, url: str, error: ReplicaFailed) -> None:
        self._down_until[url] = time.monotonic() + self._cooldown_s
        if url not in self._reported_down:
            self._reported_down.add(url)
            others = "the other replicas" if len(self.endpoints) > 1 else "it after a back-off"
            log.warning("%s failed; retrying on %s (logged once until it answers again): %s", self.where(url), others, error)

    def _replica_answered(self, url: str) -> None:
        self._down_until.pop(url, None)
        if url in self._reported_down:
            self._reported_down.discard(url)
            log.warning("%s answers again", self.where(url))

    async def post(self, path: str, make_body: Callable[[str], dict]) -> tuple[str, bytes, str]:
        """POST to some replica with failover; `make_body(url)` builds the body for that replica.

        Returns (url that answered, body, content type).
        """
        self._ensure_session()
        s = self.settings
        errors: list[str] = []
        failed: set[str] = set()
        rounds = 0
        for attempt in range(s.max_retries + 1):
            if len(failed) == len(self.endpoints):  # every replica failed since the last back-off
                await asyncio.sleep(min(s.retry_backoff_s * 2**rounds, 10.0))
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
                self._replica_failed(url, e)
                continue
            self._replica_answered(url)
            return url, payload, ctype
        raise ServerUnavailable(
            f"{self.label}: {path} failed {len(errors)} times over {self.endpoints}; last errors: " + " | ".join(errors[-3:])
        )

    async def generate(self, body: dict) -> list[dict]:
        """A raw /generate (any SGLang body) with failover; returns the response objects."""
        return (await self.generate_at(body))[1]

    async def generate_at(self, body: dict, url: str | None = None) -> tuple[str, list[dict]]:
        """`generate` that also says which replica answered; with `url`, to that replica only
        (no failover: a start-up probe of each server)."""
        sp = body.get("sampling_params")
        for params in sp if isinstance(sp, list) else [sp or {}]:
            wire.check_sampling_params(params)
        if url is None:
            url, payload, ctype = await self.post("/generate", lambda _url: body)
        else:
            payload, ctype = await self.post_to(url, "/generate", body)
        return url, wire.decode_response_body(payload, ctype, self.where(url))

    # -- administrative requests (weight updates): one named replica, no failover --------------

    async def admin(self, url: str, path: str, body: dict) -> str:
        """POST a weight-update request to `url`; returns the reply's message, raises
        `RequestRefused` with it when the server says success=false."""
        try:
            payload, _ = await self.post_to(url, path, body)
        except ReplicaFailed as e:
            raise ServerUnavailable(f"{path}: {e}") from None
        try:
            reply = json.loads(payload)
        except ValueError:
            raise wire.ProtocolError(f"{self.where(url)} answered {path} with a body that is not JSON") from None
        if not isinstance(reply, dict) or not reply.get("success"):
            raise RequestRefused(f"{self.where(url)} refused {path}: {wire.error_message(payload)}")
        return str(reply.get("message", ""))


__all__ = [
    "SGLangClient", "ClientSettings", "ClientStats", "TraceEntry", "EventLoopThread", "gather_all",
    "ServerError", "ServerUnavailable", "RequestRefused", "ReplicaFailed",
]  # fmt: skip
