"""Weight updates of a running server, SGLang's two ways (the rollout engine's weight sync).

These are administrative routes, off unless the server was started with `--weights-dir` (disk)
or `--weight-groups` (distributed); a server that takes updates and is reachable beyond
127.0.0.1 must have an API key (serving/cli.py refuses to start otherwise). Nothing a request
names is trusted:

- From disk (`/update_weights_from_disk {model_path, weight_version}`): `model_path` (a model
  dir, a checkpoint root or a complete step dir) must lie inside the `--weights-dir` the server
  was started with, symlinks resolved, and the checkpoint chosen must pass its manifest.json
  check (every file listed with its sha256, nothing unlisted: megatron_opd/models/hf/manifest.py; the
  rollout engine's disk sync writes it) before any byte of it is unpickled. The checkpoint is
  loaded into a staging copy of the model and swapped in only when the whole load succeeded, so
  a failed update answers with its error and the old weights keep serving, bit for bit. (The
  server then holds two copies of the weights: the previous ones are the next staging copy.)
- Over SGLang's weight-update group: `/init_weights_update_group` joins a process group whose
  rank 0 is the trainer, with a time limit (`--weight-group-timeout-s`), on a thread of its own so
  generation goes on meanwhile; then between `/begin_weight_update` and `/end_weight_update` each
  `/update_weights_from_distributed {names, dtypes, shapes}` receives the tensors (Hugging Face
  names, broadcast order) on that thread, and the model thread copies them in only once all of
  them arrived and map onto every parameter with its shape.

Threads: `resolve` and `receive` run on the weights thread (`WeightUpdates.thread`), `load_staged`
and `apply` on the model's main thread (megatron code must, see serving/backend.py).
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import torch

from megatron_opd.serving.backend import ModelBackend


class UpdateRefused(ValueError):
    """A weight update the server will not attempt (wrong place, failed manifest, no session)."""


def plain_error(e: BaseException) -> Exception:
    """`e` as an ordinary Exception: torch's CheckpointException derives from BaseException, and
    would otherwise escape every handler and drop the HTTP reply."""
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise e
    return e if isinstance(e, Exception) else RuntimeError(f"{type(e).__name__}: {e}")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class WeightUpdates:
    """The server's weight-update paths over one backend."""

    def __init__(
        self, backend: ModelBackend, *, weights_dir: str | Path | None = None, groups: bool = False, group_timeout_s: float = 120.0
    ):
        self.backend = backend
        self.weights_dir = Path(weights_dir).resolve() if weights_dir else None
        self.accept_groups = groups
        self.group_timeout_s = group_timeout_s
        self.groups: dict[str, Any] = {}  # /init_weights_update_group's process groups
        self.session = False  # between /begin_weight_update and /end_weight_update
        self.thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weights")
        self._staging = None  # the model the next disk update loads into

    # -- from disk --------------------------------------------------------------------------------

    def resolve(self, model_path: str) -> Path:
        """The complete, manifest-checked checkpoint dir `model_path` names, inside --weights-dir."""
        from megatron_opd.models.hf.manifest import MANIFEST, verify_manifest
        from megatron_opd.models.model_dir import read_model_dir
        from megatron_opd.runtime.checkpoint import COMPLETE, latest_complete

        b = self.backend
        if self.weights_dir is None:
            raise UpdateRefused(
                "this server was started without --weights-dir, so it loads no weights from disk; restart it "
                "with --weights-dir DIR (the directory the trainer's weight sync writes into)"
            )
        path = Path(model_path)
        path = (path if path.is_absolute() else self.weights_dir / path).resolve()
        if not _inside(path, self.weights_dir):
            raise UpdateRefused(f"model_path {model_path} is outside this server's --weights-dir {self.weights_dir}; nothing was loaded")
        if not path.exists():
            raise UpdateRefused(f"model_path {model_path} does not exist")
        if (path / "model.yaml").is_file():
            mdir = read_model_dir(path)
            if mdir.model != b.cfg:
                raise UpdateRefused(f"{path} holds a different model config than the one served: {mdir.model} vs {b.cfg}")
            if mdir.tokenizer.fingerprint != b.tokenizer.fingerprint:
                raise UpdateRefused(f"{path} has tokenizer {mdir.tokenizer.fingerprint}, the server {b.tokenizer.fingerprint}")
            ckpt = mdir.latest_checkpoint()
        elif (path / COMPLETE).is_file():
            ckpt = path
        else:
            ckpt = latest_complete(path)
            if ckpt is None:
                raise UpdateRefused(f"{path} is neither a model dir, a complete checkpoint nor a root holding one")
        ckpt = ckpt.resolve()
        if not _inside(ckpt, self.weights_dir):
            raise UpdateRefused(f"{model_path} leads to {ckpt}, outside this server's --weights-dir {self.weights_dir}")
        if not (ckpt / MANIFEST).is_file():
            raise UpdateRefused(
                f"{ckpt} has no {MANIFEST}: the server loads only checkpoints whose files are listed with their "
                f"sha256 (the rollout engine's disk sync writes one; `megatron_opd.models.hf.manifest.write_manifest` too)"
            )
        problems = verify_manifest(ckpt)
        if problems:
            raise UpdateRefused(f"{ckpt} fails its {MANIFEST} check, nothing was loaded: " + "; ".join(problems[:8]))
        return ckpt

    def load_staged(self, ckpt: Path) -> str:
        """Load `ckpt` (from `resolve`) into the staging model and swap it in (main thread)."""
        from megatron_opd.runtime.checkpoint import checkpoint_id, load_checkpoint

        b = self.backend
        if self._staging is None:
            self._staging = b.build_model()
        try:
            load_checkpoint(ckpt, [self._staging], load_rng=False)
            new_id = checkpoint_id(ckpt)
        except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
            raise RuntimeError(f"loading {ckpt} failed; the served weights are unchanged: {plain_error(e)}") from None
        b.model, self._staging = self._staging, b.model
        b.model_path, b.checkpoint_id = str(ckpt), new_id
        return str(ckpt)

    # -- distributed (SGLang's protocol; the trainer is rank 0 and broadcasts) ----------------------

    def _groups_on(self) -> None:
        if not self.accept_groups:
            raise UpdateRefused("this server takes no weight-update groups; restart it with --weight-groups")

    def init_group(self, body: dict) -> str:
        """Join the trainer's weight-update group (weights thread, bounded by group_timeout_s)."""
        from megatron_opd.runtime.distributed import standalone_group

        self._groups_on()
        name = body.get("group_name", "weight_update_group")
        if not name:
            raise UpdateRefused("Group name cannot be empty")
        address, port = body["master_address"], int(body["master_port"])
        try:
            # One process serves here: its rank is the offset (SGLang adds its TP rank).
            group = standalone_group(
                body.get("backend", "nccl"), address, port, int(body["rank_offset"]), int(body["world_size"]),
                timeout_s=self.group_timeout_s,
            )  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - a timeout is a DistStoreError, reported to the caller
            raise RuntimeError(
                f"could not join the group at {address}:{port} within {self.group_timeout_s:g} s "
                f"(--weight-group-timeout-s): {plain_error(e)}"
            ) from None
        self.groups[name] = group
        return "Succeeded to initialize custom process group."

    def destroy_group(self, name: str) -> str:
        self._groups_on()
        if self.groups.pop(name, None) is None:
            raise UpdateRefused("The group to be destroyed does not exist.")
        return "Succeeded to destroy custom process group."

    def begin(self) -> None:
        self._groups_on()
        if self.session:
            raise UpdateRefused("a weight-update session is already open; call end_weight_update() first")
        self.session = True

    def end(self) -> None:
        self._groups_on()
        if not self.session:
            raise UpdateRefused("no weight-update session is open; call begin_weight_update() first")
        self.session = False

    def receive(self, body: dict) -> dict[str, torch.Tensor]:
        """Receive `names` (Hugging Face names) broadcast from rank 0, in order (weights thread)."""
        from megatron_opd.runtime.distributed import broadcast_from

        self._groups_on()
        if not self.session:
            raise UpdateRefused("update_weights_from_distributed must run between begin_weight_update() and end_weight_update()")
        group = self.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise UpdateRefused(f"no weight-update group {body.get('group_name')!r}: call /init_weights_update_group first")
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not len(names) == len(dtypes) == len(shapes):
            raise UpdateRefused(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
        # Receive everything first: the broadcast order is the sender's, whatever we do with it.
        received = {}
        try:
            for name, dtype, shape in zip(names, dtypes, shapes):  # on the model's device: NCCL needs CUDA
                tensor = torch.empty(shape, dtype=getattr(torch, str(dtype).replace("torch.", "")), device=self.backend.device)
                broadcast_from(group, tensor, 0)
                received[name] = tensor
        except BaseException as e:  # noqa: BLE001 - a broadcast timeout, reported to the caller
            raise RuntimeError(f"receiving {len(names)} tensors failed after {len(received)}: {plain_error(e)}") from None
        return received

    def apply(self, received: dict[str, torch.Tensor]) -> str:
        """Copy received tensors into the model once they cover every parameter (main thread)."""
        from megatron_opd.models.hf.live import megatron_from_hf

        b = self.backend
        params = dict(b.model.named_parameters())
        full = megatron_from_hf(b.cfg, {n: tuple(p.shape) for n, p in params.items()}, received)
        missing = sorted(set(params) - set(full))
        wrong = [f"{n}: {tuple(t.shape)} for {tuple(params[n].shape)}" for n, t in full.items() if n in params and t.shape != params[n].shape]
        if missing or wrong:
            raise UpdateRefused(f"the update does not cover the model; nothing was changed: missing {missing[:5]}, wrong shapes {wrong[:5]}")
        with torch.no_grad():
            for name, tensor in full.items():
                params[name].copy_(tensor)
        b.checkpoint_id = None  # a trainer's weights, not a checkpoint on disk
        return "Succeeded to update parameter online."

    def close(self) -> None:
        self.thread.shutdown(wait=False, cancel_futures=True)
