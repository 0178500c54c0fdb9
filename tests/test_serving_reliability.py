"""The server under abuse (issue 11, items 6, 7, 8 and 12's marker): real server subprocesses on
127.0.0.1, real checkpoints, a crafted pickle that would write a marker file.

- weight updates are off unless asked for; disk updates load only manifest-checked checkpoints
  inside --weights-dir; a server that takes updates, bound beyond loopback without an API key,
  refuses to start;
- a failed update answers with its error and the old weights keep serving, bit for bit;
- joining an unreachable weight-update group times out without holding up generation; /health
  is 503 while the model thread is stuck; oversize requests get 400/413 naming the limit;
- checkpoint ids: unique per save, and checkpoints with old "N" markers still load.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_opd.models.hf.manifest import write_manifest
from megatron_opd.data.tokenizer import CharTokenizer
from megatron_opd.models.config import ModelConfig
from megatron_opd.serving.launch import REPO_ROOT, start_teacher_server, subprocess_env

TOK = CharTokenizer()
MODEL = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=64, init_std=0.2)
PROBE = {"input_ids": [[5, 9, 14, 3, 22, 8, 30]], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
         "logprob_start_len": 0, "top_logprobs_num": 5}  # fmt: skip


class Payload:
    """Unpickling this runs code: it writes `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@dataclass
class Dirs:
    root: Path
    weights: Path  # the server's --weights-dir, holding model dirs a and b
    a: Path
    b: Path


def http(method: str, url: str, body=None, timeout: float = 60, raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scores(url: str) -> tuple:
    """The input logprobs and top-k of PROBE, exactly as served (JSON floats round-trip exactly)."""
    status, raw = http("POST", url + "/generate", PROBE)
    assert status == 200, raw
    meta = json.loads(raw)[0]["meta_info"]
    return json.dumps(meta["input_token_logprobs"]), json.dumps(meta["input_top_logprobs"])


def update(url: str, path) -> tuple[int, dict]:
    status, raw = http("POST", url + "/update_weights_from_disk", {"model_path": str(path), "weight_version": "x"})
    return status, json.loads(raw)


def _make_dirs(root: str) -> None:
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.models.model_dir import write_model_dir
    from megatron_opd.runtime.checkpoint import save_checkpoint
    from megatron_opd.runtime.distributed import init_runtime, seed_everything
    from megatron_opd.runtime.layout import ParallelLayout

    init_runtime(ParallelLayout(), seed=0)
    for name, seed in (("a", 21), ("b", 22)):
        seed_everything(seed)
        mdir = write_model_dir(Path(root) / "weights" / name, MODEL, TOK)
        write_manifest(save_checkpoint(mdir.checkpoints, 1, [build_gpt_model(MODEL, ParallelLayout())]), "test")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Dirs:
    from megatron_opd.runtime.spawn import spawn_world

    root = tmp_path_factory.mktemp("serving")
    spawn_world(_make_dirs, 1, (str(root),))
    return Dirs(root, root / "weights", root / "weights" / "a", root / "weights" / "b")


@pytest.fixture(scope="module")
def server(dirs):
    flags = ["--weight-groups", "--weight-group-timeout-s", "3", "--max-batch-size", "8", "--max-request-tokens", "200", "--max-body-mb", "0.5"]
    with start_teacher_server(model_dir=dirs.a, weights_dir=dirs.weights, extra_args=flags) as handle:
        yield handle


def step(model_dir: Path) -> Path:
    return model_dir / "checkpoints" / "step_00000001"


# ---------------------------------------------------------------------------------------------
# Item 6: nothing a request names is unpickled from an unchecked file


def test_disk_updates_load_only_checked_checkpoints_inside_the_weights_dir(server, dirs):
    url, marker = server.url, dirs.root / "MARKER"

    def crafted(where: Path, manifest: bool) -> Path:
        shutil.copytree(step(dirs.b), where)
        (where / "manifest.json").unlink()
        if manifest:  # listed as the good file was, then swapped
            write_manifest(where, "test")
        (where / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
        return where

    before = scores(url)
    outside = crafted(dirs.root / "evil" / "step_00000001", manifest=False)
    status, reply = update(url, outside)
    assert status == 400 and reply["success"] is False
    assert f"is outside this server's --weights-dir {dirs.weights.resolve()}" in reply["message"]
    (dirs.weights / "link").symlink_to(outside.parent, target_is_directory=True)  # a way out through a link
    status, reply = update(url, dirs.weights / "link")
    assert status == 400 and "outside this server's --weights-dir" in reply["message"]
    unlisted = crafted(dirs.weights / "unlisted" / "step_00000001", manifest=False)
    status, reply = update(url, unlisted)
    assert status == 400 and "has no manifest.json" in reply["message"]
    stale = crafted(dirs.weights / "stale" / "step_00000001", manifest=True)
    status, reply = update(url, stale)
    assert status == 400 and "fails its manifest.json check" in reply["message"] and "changed: .metadata" in reply["message"]
    assert not marker.exists(), "a crafted .metadata was unpickled"
    assert scores(url) == before
    # A checked checkpoint inside the directory loads (a model dir: its newest checkpoint).
    status, reply = update(url, dirs.b)
    assert status == 200 and reply["success"], reply
    assert scores(url) != before
    assert update(url, dirs.a)[0] == 200 and scores(url) == before


def test_weight_updates_are_off_unless_asked_for_and_need_a_key_beyond_loopback(dirs):
    def serve(*flags: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "megatron_opd.serving", "--model-dir", str(dirs.a), "--port", "0", *flags]
        return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=str(REPO_ROOT), timeout=120)

    for flags in (["--weights-dir", str(dirs.weights)], ["--weight-groups"]):
        done = serve("--host", "0.0.0.0", *flags)
        assert done.returncode == 2, done.stderr
        assert "--host 0.0.0.0 makes the server reachable beyond this machine" in done.stderr and "--api-key" in done.stderr
    # A teacher that takes no updates may serve beyond loopback; its update routes are off.
    with start_teacher_server(model_dir=dirs.a, host="0.0.0.0") as teacher:
        url = teacher.url.replace("0.0.0.0", "127.0.0.1")
        status, reply = update(url, dirs.b)
        assert status == 400 and "started without --weights-dir" in reply["message"]
        status, raw = http("POST", url + "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1,
                                                                        "rank_offset": 1, "world_size": 2})  # fmt: skip
        assert status == 400 and "restart it with --weight-groups" in json.loads(raw)["message"]
        assert http("POST", url + "/begin_weight_update", {})[0] == 400


# ---------------------------------------------------------------------------------------------
# Item 7: a failed update leaves the live weights as they were


def test_a_failed_update_keeps_the_old_weights_serving_bit_for_bit(server, dirs):
    url = server.url
    info = json.loads(http("GET", url + "/model_info")[1])
    before = scores(url)
    broken = dirs.weights / "broken" / "step_00000001"
    shutil.copytree(step(dirs.b), broken)
    data = (broken / ".metadata").read_bytes()
    (broken / ".metadata").write_bytes(data[: len(data) // 2])  # truncated, then listed as written
    (broken / "manifest.json").unlink()
    write_manifest(broken, "test")
    status, reply = update(url, broken)
    assert status == 400 and reply["success"] is False
    assert "failed; the served weights are unchanged" in reply["message"] and "truncated" in reply["message"]
    assert scores(url) == before  # exactly the same numbers
    assert http("GET", url + "/health")[0] == 200
    after = json.loads(http("GET", url + "/model_info")[1])
    assert (after["model_path"], after["checkpoint_id"]) == (info["model_path"], info["checkpoint_id"])
    # The staging copy is reusable: a good update after the failure takes effect, then back.
    assert update(url, dirs.b)[0] == 200 and scores(url) != before
    assert update(url, dirs.a)[0] == 200 and scores(url) == before


# ---------------------------------------------------------------------------------------------
# Item 8: bounded waits, honest health, size limits


def test_an_unreachable_weight_group_times_out_while_generation_goes_on(server):
    from megatron_opd.runtime.spawn import free_port

    url, port = server.url, free_port()  # nothing listens there
    box = {}
    body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2, "group_name": "g", "backend": "gloo"}
    t0 = time.monotonic()
    joining = threading.Thread(target=lambda: box.update(reply=http("POST", url + "/init_weights_update_group", body)))
    joining.start()
    time.sleep(0.5)
    t1 = time.monotonic()
    assert http("POST", url + "/generate", PROBE, timeout=20)[0] == 200
    assert http("GET", url + "/health", timeout=5)[0] == 200
    assert time.monotonic() - t1 < 2.5, "generation waited for the group set-up"
    joining.join(60)
    status, raw = box["reply"]
    reply = json.loads(raw)
    assert status == 400 and reply["success"] is False
    assert f"could not join the group at 127.0.0.1:{port} within 3 s (--weight-group-timeout-s)" in reply["message"]
    assert time.monotonic() - t0 < 30


def test_oversize_requests_are_refused_naming_the_limit(server):
    url = server.url + "/generate"
    status, raw = http("POST", url, {"input_ids": [[1, 2, 3]] * 9, "sampling_params": {"max_new_tokens": 0}})
    assert status == 400 and "9 sequences" in raw.decode() and "--max-batch-size" in raw.decode()
    status, raw = http("POST", url, {"input_ids": [[1, 2, 3] * 8] * 8, "sampling_params": {"max_new_tokens": 2}})
    message = json.loads(raw)["error"]["message"]
    assert status == 400 and "holds 208 tokens" in message and "at most 200" in message and "--max-request-tokens" in message
    padding = json.dumps({"input_ids": [1, 2], "rid": "x" * 600_000}).encode()
    status, raw = http("POST", url, raw=padding)
    assert status == 413 and "--max-body-mb" in json.loads(raw)["error"]["message"]
    assert http("POST", url, {"input_ids": [[1, 2, 3]] * 8, "sampling_params": {"max_new_tokens": 2}})[0] == 200


def test_health_is_503_while_the_model_thread_is_stuck():
    """The server's own app and worker in this process; a job that makes no progress stands in
    for a stuck model thread (a forward or load that hangs)."""
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout
    from megatron_opd.serving.app import AppOptions, HttpThread, MainThreadWorker, build_app
    from megatron_opd.serving.backend import ModelBackend
    from megatron_opd.serving.weights import WeightUpdates

    init_runtime(ParallelLayout(), seed=0)
    backend = ModelBackend(build_gpt_model(MODEL, ParallelLayout()).eval(), MODEL, TOK, model_path="x", weight_version="v", seed=0)
    worker, stop, release = MainThreadWorker(), threading.Event(), threading.Event()
    app = build_app(backend, WeightUpdates(backend), worker, AppOptions(health_timeout_s=0.5), {"stopping": False})
    server = HttpThread(app, "127.0.0.1", 0)
    server.start()
    server.ready.wait()
    model_thread = threading.Thread(target=worker.run_until, args=(stop, server), daemon=True)
    model_thread.start()
    url = f"http://127.0.0.1:{server.port}/health"
    try:
        assert http("GET", url)[0] == 200
        stuck = worker.submit(release.wait)
        time.sleep(1.0)
        assert http("GET", url)[0] == 503
        release.set()
        stuck.result(10)
        assert http("GET", url)[0] == 200
    finally:
        release.set()
        stop.set()
        model_thread.join(10)
        server.stop()


# ---------------------------------------------------------------------------------------------
# Item 12's marker: a unique id per save; old markers still load


def _ids_worker(root: str) -> tuple:
    from megatron_opd.models.gpt import build_gpt_model
    from megatron_opd.runtime.checkpoint import checkpoint_id, latest_complete, load_checkpoint, save_checkpoint
    from megatron_opd.runtime.distributed import init_runtime
    from megatron_opd.runtime.layout import ParallelLayout

    init_runtime(ParallelLayout(), seed=0)
    model = build_gpt_model(MODEL, ParallelLayout())
    first = save_checkpoint(Path(root) / "x", 1, [model])
    again = save_checkpoint(Path(root) / "y", 1, [model])
    old = save_checkpoint(Path(root) / "old", 3, [model])
    (old / "COMPLETE").write_text("3\n")  # what saves wrote before ids
    fresh = build_gpt_model(MODEL, ParallelLayout())
    load_checkpoint(latest_complete(Path(root) / "old"), [fresh], load_rng=False)
    same = all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), fresh.state_dict().values()) if torch.is_tensor(p))
    marker = json.loads((first / "COMPLETE").read_text())
    return checkpoint_id(first), checkpoint_id(again), checkpoint_id(old), marker, same


def test_checkpoint_ids_are_unique_and_old_markers_still_load(tmp_path):
    from megatron_opd.runtime.spawn import spawn_world

    first, again, old, marker, same = spawn_world(_ids_worker, 1, (str(tmp_path),))[0]
    assert first and again and first != again and len(first) == 32
    assert marker == {"step": 1, "id": first}
    assert old is None and same
