"""Weight updates of a running server, SGLang's two ways (the rollout engine's weight sync).

- From disk (`/update_weights_from_disk {model_path, weight_version}`): a model dir (its newest
  checkpoint), a checkpoint root or a complete step dir.
- Over SGLang's weight-update group: `/init_weights_update_group` joins a process group whose
  rank 0 is the trainer, then between `/begin_weight_update` and `/end_weight_update` each
  `/update_weights_from_distributed {names, dtypes, shapes}` receives the tensors, under their
  Hugging Face names, in broadcast order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_opd.serving.backend import ModelBackend


class WeightUpdates:
    """The server's weight-update paths over one backend (main thread only)."""

    def __init__(self, backend: ModelBackend):
        self.backend = backend
        self.groups: dict[str, Any] = {}  # /init_weights_update_group's process groups
        self.session = False  # between /begin_weight_update and /end_weight_update

    # -- from disk --------------------------------------------------------------------------------

    def load_from_disk(self, model_path: str) -> str:
        """Load weights from a model dir (its newest checkpoint), a checkpoint root or a step dir."""
        from megatron_opd.models.model_dir import read_model_dir
        from megatron_opd.runtime.checkpoint import COMPLETE, latest_complete, load_checkpoint

        b = self.backend
        path = Path(model_path)
        if (path / "model.yaml").is_file():
            mdir = read_model_dir(path)
            if mdir.model != b.cfg:
                raise ValueError(f"{path} holds a different model config than the one served: {mdir.model} vs {b.cfg}")
            if mdir.tokenizer.fingerprint != b.tokenizer.fingerprint:
                raise ValueError(f"{path} has tokenizer {mdir.tokenizer.fingerprint}, the server {b.tokenizer.fingerprint}")
            ckpt = mdir.latest_checkpoint()
        elif (path / COMPLETE).is_file():
            ckpt = path
        else:
            ckpt = latest_complete(path)
            if ckpt is None:
                raise ValueError(f"{path} is neither a model dir, a complete checkpoint nor a root holding one")
        load_checkpoint(ckpt, [b.model], load_rng=False)
        b.model_path = str(ckpt)
        return str(ckpt)

    # -- distributed (SGLang's protocol; the trainer is rank 0 and broadcasts) ----------------------

    def init_group(self, body: dict) -> str:
        from megatron_opd.runtime.distributed import standalone_group

        name = body.get("group_name", "weight_update_group")
        if not name:
            raise ValueError("Group name cannot be empty")
        # One process serves here: its rank is the offset (SGLang adds its TP rank).
        self.groups[name] = standalone_group(
            body.get("backend", "nccl"), body["master_address"], int(body["master_port"]),
            int(body["rank_offset"]), int(body["world_size"]),
        )  # fmt: skip
        return "Succeeded to initialize custom process group."

    def destroy_group(self, name: str) -> str:
        if self.groups.pop(name, None) is None:
            raise ValueError("The group to be destroyed does not exist.")
        return "Succeeded to destroy custom process group."

    def begin(self) -> None:
        if self.session:
            raise ValueError("a weight-update session is already open; call end_weight_update() first")
        self.session = True

    def end(self) -> None:
        if not self.session:
            raise ValueError("no weight-update session is open; call begin_weight_update() first")
        self.session = False

    def receive(self, body: dict) -> str:
        """Receive `names` (Hugging Face names) broadcast from rank 0 in order, then load them."""
        from checkpoints_tools.live import megatron_from_hf
        from megatron_opd.runtime.distributed import broadcast_from

        b = self.backend
        if not self.session:
            raise ValueError("update_weights_from_distributed must run between begin_weight_update() and end_weight_update()")
        group = self.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise ValueError(f"no weight-update group {body.get('group_name')!r}: call /init_weights_update_group first")
        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
        # Receive everything first: the broadcast order is the sender's, whatever we do with it.
        received = {}
        for name, dtype, shape in zip(names, dtypes, shapes):  # on the model's device: NCCL needs CUDA
            tensor = torch.empty(shape, dtype=getattr(torch, str(dtype).replace("torch.", "")), device=b.device)
            broadcast_from(group, tensor, 0)
            received[name] = tensor
        params = dict(b.model.named_parameters())
        full = megatron_from_hf(b.cfg, {n: tuple(p.shape) for n, p in params.items()}, received)
        with torch.no_grad():
            for name, tensor in full.items():
                params[name].copy_(tensor)
        return "Succeeded to update parameter online."
