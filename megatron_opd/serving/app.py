"""The HTTP face of the server: SGLang's routes on aiohttp, and the thread plumbing behind them.

Routes (SGLang's shapes): POST/PUT /generate; GET /health, /health_generate, /model_info
(/get_model_info); /flush_cache; the weight updates POST /update_weights_from_disk,
/init_weights_update_group, /destroy_weights_update_group, /begin_weight_update,
/end_weight_update, /update_weights_from_distributed. With an API key every route but /health*
requires `Authorization: Bearer <key>` (401 {"error": "Unauthorized"}), as in SGLang.

Threads: the model (megatron, torch) runs on the main thread, which drains `MainThreadWorker`'s
queue; the aiohttp event loop runs on `HttpThread`, so /health answers while a forward runs;
weight-group rendezvous, receives and manifest checks run on the weights thread
(serving/weights.py), so a slow or unreachable trainer never holds up generation.

Health: /health answers 503 while the server is stopping or when the model thread has made no
progress for `health_timeout_s` on the job it is running (SGLang's /health waits 20 s for the
scheduler to answer, SGLANG_HEALTH_CHECK_TIMEOUT); /health_generate runs a one-token generation.
Limits: a body over `max_body_bytes` gets 413, a request over the sequence or token limits 400,
each naming the flag that sets it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

from megatron_opd.serving import wire
from megatron_opd.serving.backend import ModelBackend
from megatron_opd.serving.requests import GenItem, RequestError, ServerLimits, parse_generate
from megatron_opd.serving.responses import ResponseContext, encode_response
from megatron_opd.serving.weights import UpdateRefused, WeightUpdates, plain_error


@dataclass(frozen=True)
class AppOptions:
    api_key: str = ""  # required on every route but /health* when set
    plain_sglang: bool = False  # no extensions: behave like a stock SGLang server
    hidden_states_layout: str = "rows"  # JSON hidden_states as 1-D rows or a 2-D prefill block then rows
    tokenizer_path: str = ""  # reported in /model_info
    max_batch_size: int = 512  # sequences per /generate request
    max_request_tokens: int = 65536  # inputs plus max_new_tokens, summed over a request's sequences
    sampling_mask_max_tokens: int = 4096  # the largest kept set a sampling mask holds (SGLang's flag)
    routed_experts: bool = False  # --enable-return-routed-experts: answer return_routed_experts
    max_body_bytes: int = 64 << 20  # request body size (413 beyond)
    health_timeout_s: float = 20.0  # /health is 503 when the model thread is stuck this long


class MainThreadWorker:
    """A job queue the main thread drains; HTTP handlers await its futures.

    `beat()` (called by the job, e.g. after each forward) and the start and end of every job
    mark progress; `stalled_for()` is how long the running job has gone without any.
    """

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._busy = False
        self._progress_at = time.monotonic()

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        return fut

    def beat(self) -> None:
        self._progress_at = time.monotonic()

    def stalled_for(self) -> float:
        return time.monotonic() - self._progress_at if self._busy else 0.0

    def run_until(self, stop: threading.Event, http: "HttpThread") -> None:
        while not stop.is_set() and http.is_alive():
            try:
                fut, fn, args = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            self.beat()
            self._busy = True
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                fut.set_exception(plain_error(e))
            finally:
                self._busy = False
                self.beat()
        while True:  # fail what is still queued so no request waits forever
            try:
                fut, _, _ = self._jobs.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("server is shutting down"))


class HttpThread(threading.Thread):
    def __init__(self, app, host: str, port: int):
        super().__init__(name="http", daemon=True)
        self.app, self.host, self.port = app, host, port
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        from aiohttp import web

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        # In-flight requests get 2 s to finish on SIGTERM (aiohttp waits 60 s by default).
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        try:
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            self.loop.run_until_complete(site.start())
            self.port = runner.addresses[0][1]
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def stop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.join(timeout=10)


def build_app(backend: ModelBackend, updates: WeightUpdates, worker: MainThreadWorker, options: AppOptions, state: dict):
    from aiohttp import web

    plain = options.plain_sglang
    limits = ServerLimits(
        backend.cfg.max_seq_len, options.max_batch_size, options.max_request_tokens, options.sampling_mask_max_tokens
    )
    json_response = lambda obj, status=200: web.Response(body=json.dumps(obj).encode(), status=status, content_type="application/json")  # noqa: E731

    @web.middleware
    async def auth(request, handler):
        path = request.path
        if options.api_key and not path.startswith(("/health", "/ready", "/metrics")):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token, options.api_key):
                return json_response({"error": "Unauthorized"}, 401)
        return await handler(request)

    async def on_model(fn, *a):
        return await asyncio.wrap_future(worker.submit(fn, *a))

    async def on_weights_thread(fn, *a):
        return await asyncio.wrap_future(updates.thread.submit(fn, *a))

    def too_large(e) -> web.Response:
        return json_response(
            {"error": {"message": f"the request body is over this server's limit of {options.max_body_bytes} bytes "
                                  f"(--max-body-mb): {e.text}"}}, 413)  # fmt: skip

    def context() -> ResponseContext:
        return ResponseContext(
            vocab_size=backend.cfg.vocab_size,
            weight_version=backend.weight_version,
            decode=backend.tokenizer.decode,
            token_text=backend.token_text,
            hidden_layout=options.hidden_states_layout,
        )

    async def generate(request):
        t0 = time.perf_counter()
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge as e:
            return too_large(e)
        except ValueError as e:
            return json_response({"error": {"message": f"request body is not JSON: {e}"}}, 400)
        try:
            call = parse_generate(
                body, vocab_size=backend.cfg.vocab_size, encode=backend.tokenizer.encode, plain=plain, limits=limits,
                routed_experts=options.routed_experts,
            )  # fmt: skip
        except RequestError as e:
            return json_response(e.body(), e.status)

        def work():
            results = backend.run(call.items, on_step=worker.beat)
            latency = time.perf_counter() - t0
            ctx = context()
            responses = [encode_response(call, it, res, latency, ctx) for it, res in zip(call.items, results)]
            if call.binary:
                return wire.encode_binary(responses), wire.BINARY_CONTENT_TYPE
            return json.dumps(responses if call.is_batch else responses[0]).encode(), "application/json"

        try:
            payload, ctype = await on_model(work)
        except RuntimeError as e:
            return json_response({"error": {"message": str(e)}}, 503)
        return web.Response(body=payload, content_type=ctype)

    async def health(request):
        stuck = worker.stalled_for() > options.health_timeout_s
        return web.Response(status=503 if state["stopping"] or stuck else 200)

    async def health_generate(request):
        if state["stopping"]:
            return web.Response(status=503)
        probe = [GenItem(input_ids=[0], max_new_tokens=1, temperature=0.0)]
        try:
            await asyncio.wait_for(on_model(backend.run, probe), timeout=20)
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(request):
        info = {
            "model_path": backend.model_path,
            "served_model_name": backend.model_path,
            "tokenizer_path": options.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": backend.weight_version,
            "load_format": None,
            "reasoning_parser": None,
            "tool_call_parser": None,
            "disaggregation_mode": "null",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "megatron_gpt",
            "architectures": ["MegatronGPTModel"],
        }
        if not plain:
            info.update({
                wire.INFO_VOCAB_SIZE: backend.cfg.vocab_size,
                wire.INFO_FINGERPRINT: backend.tokenizer.fingerprint,
                wire.INFO_TOKENIZER_DIGEST: backend.tokenizer.describe().digest(),
                wire.INFO_HIDDEN_SIZE: backend.cfg.hidden_size,
                wire.INFO_CHECKPOINT_ID: backend.checkpoint_id,
                "max_context_length": backend.cfg.max_seq_len,
                wire.INFO_SERVER: {"version": 1, "binary_signal": 1, "full_logprobs": True, "hidden_states_layout": options.hidden_states_layout},
            })  # fmt: skip
        return json_response(info)

    async def tokenizer_description(request):
        return json_response(backend.tokenizer.describe().to_json())

    async def flush_cache(request):
        # There is no prefix cache to flush; SGLang's reply text, status 200.
        return web.Response(
            text="Cache flushed.\nPlease check backend logs for more details. (When there are running or "
            "waiting requests, the operation will not be performed.)\n"
        )

    async def update_weights_from_disk(request):
        try:
            body = await request.json()
            path = body["model_path"]
        except web.HTTPRequestEntityTooLarge as e:
            return too_large(e)
        except (ValueError, KeyError, TypeError):
            return json_response({"success": False, "message": "body must be JSON with model_path", "num_paused_requests": 0}, 400)
        try:
            checkpoint = await on_weights_thread(updates.resolve, str(path))  # confined, manifest-checked
            loaded = await on_model(updates.load_staged, checkpoint)
        except Exception as e:  # noqa: BLE001 - reported to the caller as SGLang does
            return json_response({"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": 0}, 400)
        if body.get("weight_version") is not None:
            backend.weight_version = str(body["weight_version"])
        return json_response(
            {"success": True, "message": f"Succeeded to update model weights from {loaded}.", "num_paused_requests": 0}
        )

    def sglang_reply(message: str, ok: bool = True):
        return json_response({"success": ok, "message": message}, 200 if ok else 400)

    async def json_body(request) -> dict:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    async def init_weights_update_group(request):
        try:
            message = await on_weights_thread(updates.init_group, await json_body(request))
        except Exception as e:  # noqa: BLE001 - SGLang answers failures in the body
            return sglang_reply(f"Failed to initialize custom process group: {e}.", False)
        return sglang_reply(message)

    async def destroy_weights_update_group(request):
        try:
            body = await json_body(request)
            message = await on_weights_thread(updates.destroy_group, body.get("group_name", "weight_update_group"))
        except Exception as e:  # noqa: BLE001
            return sglang_reply(f"Failed to destroy custom process group: {e}.", False)
        return sglang_reply(message)

    async def begin_weight_update(request):
        try:
            updates.begin()
        except UpdateRefused as e:
            return sglang_reply(str(e), False)
        return sglang_reply("Success")

    async def end_weight_update(request):
        try:
            updates.end()
        except UpdateRefused as e:
            return sglang_reply(str(e), False)
        return sglang_reply("Success")

    async def update_weights_from_distributed(request):
        try:
            body = await json_body(request)
            received = await on_weights_thread(updates.receive, body)
            message = await on_model(updates.apply, received)
        except Exception as e:  # noqa: BLE001
            return sglang_reply(f"Failed to receive weights: {e}", False)
        if body.get("weight_version") is not None:
            backend.weight_version = str(body["weight_version"])
        return sglang_reply(message)

    app = web.Application(middlewares=[auth], client_max_size=options.max_body_bytes)
    app.router.add_route("POST", "/generate", generate)
    app.router.add_route("PUT", "/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/model_info", model_info)
    app.router.add_get("/get_model_info", model_info)
    if not plain:  # stock SGLang has no such route
        app.router.add_get(wire.TOKENIZER_DESCRIPTION_PATH, tokenizer_description)
    app.router.add_route("*", "/flush_cache", flush_cache)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    app.router.add_post("/init_weights_update_group", init_weights_update_group)
    app.router.add_post("/destroy_weights_update_group", destroy_weights_update_group)
    app.router.add_post("/begin_weight_update", begin_weight_update)
    app.router.add_post("/end_weight_update", end_weight_update)
    app.router.add_post("/update_weights_from_distributed", update_weights_from_distributed)
    return app
