"""The SGLang rollout engine: trajectories sampled by SGLang servers over HTTP, weights pushed back.

Sampling is SGLang's `/generate` with `return_logprob` (the sampler's log-probs of its own tokens
become `behavior_logprobs`), EOS as a stop token and a per-sample `sampling_seed` derived from
the sample id, so a resumed run asks for exactly the samples an uninterrupted one did.

The RL extras, as the embedded engine records them (rollout/embedded.py), in SGLang 0.5.23's
fields (serving/wire.py has the wire shapes and the file:line they come from):
- keep sampling mask (truncating sampling, rollout.keep_sampling_mask): `return_sampling_mask`;
  each output token's kept ids become `kept_ids` [B, R, K] (-1 padded, never a dense [B, R, V]
  mask) and its "selected" log-prob `kept_logprobs` [B, R]. SGLang needs a finite top_k for it,
  so rollout.top_k=0 is sent as top_k = the vocabulary size (the same distribution);
- keep routing (rollout.keep_routing): `return_routed_experts` with `routed_experts_start_len=0`;
  the base64 int32 [seqlen - 1, num_layers, topk] array becomes `routed_experts` [B, T,
  moe_layers, topk]. SGLang returns it only when started with --enable-return-routed-experts.
Before the first rollout every server is probed with a one-token request asking for what the run
needs; a server that does not return it (an SGLang without the field, our server with
--plain-sglang, a server without --enable-return-routed-experts) is an error naming its URL and
the option, before any optimizer step.

Weight sync (`rollout.weight_sync`):
- "disk": after an update every rank writes a weights-only dist checkpoint under
  `<run_dir>/rollout_weights/` with a manifest.json of every file's sha256 (our server loads only
  such checkpoints, from the `--weights-dir` it was started with; rank 0 exports it to Hugging
  Face format too when `rollout.weight_format=hf`, for stock SGLang), then each server gets
  `/update_weights_from_disk {model_path, weight_version, flush_cache}`;
- "distributed": the TP ranks gather full tensors, trainer rank 0 maps them to Hugging Face names
  (megatron_opd.models.hf.live) and broadcasts them through SGLang's weight-update group: once
  `/init_weights_update_group` (rank 0 is the trainer, server i holds ranks 1 + i *
  rollout.server_ranks ...), then per sync `/begin_weight_update`,
  `/update_weights_from_distributed {names, dtypes, shapes, group_name, weight_version}` while
  broadcasting the tensors in that order, and `/end_weight_update` (SGLang 0.5.23 refuses an
  update outside such a session). NCCL with CUDA tensors, gloo without.
The first push happens before the first rollout (not when the engine is built, which is before
the trainer loaded train.init_from or a resumed checkpoint). Every trajectory carries the
`weight_version` its server reported; a row from weights other than the trainer's last push is
an error. All HTTP goes through the one SGLang client (serving/client.py).

Within a data-parallel replica only the first model-parallel rank talks HTTP; it broadcasts the
batch to the rest of its group.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.data.prompts import Prompt, encode_prompts
from megatron_opd.data.tokenizer import Tokenizer, description_difference, digest_difference
from megatron_opd.data.trajectories import Trajectories, pack
from megatron_opd.rollout.config import RolloutConfig
from megatron_opd.rollout.embedded import truncates
from megatron_opd.runtime import checkpoint as ckpt
from megatron_opd.runtime.distributed import broadcast_object, first_error, replica_group_and_src
from megatron_opd.serving import wire
from megatron_opd.serving.client import ClientSettings, EventLoopThread, RequestRefused, SGLangClient, gather_all

def update_body_for(tensors: dict[str, torch.Tensor], group_name: str, version: str) -> dict:
    """/update_weights_from_distributed for `tensors` (Hugging Face names, in broadcast order)."""
    dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors.values()]
    return wire.distributed_update_body(list(tensors), dtypes, [tuple(t.shape) for t in tensors.values()], group_name, version)


class RolloutServerError(RuntimeError):
    """A rollout server answered something that cannot become a trajectory; names server and row."""


def sample_seed(seed: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


class SGLangRolloutEngine:
    def __init__(self, cfg: RolloutConfig, trainer, tokenizer: Tokenizer, *, max_len: int, seed: int):
        self.cfg, self.trainer, self.tokenizer, self.max_len, self.seed = cfg, trainer, tokenizer, max_len, seed
        self.group, self.src = replica_group_and_src()
        self.is_src = dist.get_rank() == self.src
        self.version = ""
        self.client = None
        self.update_group = None  # distributed sync: trainer rank 0's side of the group
        # Unique per engine: a server can hold groups of several trainers (or tests) at once.
        self.group_name = f"megatron-opd-{os.getpid()}-{id(self):x}"
        error = None
        if self.is_src:
            self._loop = EventLoopThread("rollout-client")
            settings = ClientSettings(endpoints=tuple(cfg.endpoints), api_key=cfg.api_key, timeout_s=cfg.timeout_s)
            self.client = SGLangClient("rollout server", settings)
            self._loop.run(self.client.start())
            try:
                self._loop.run(self._check_tokenizers())
            except RolloutServerError as e:
                error = str(e)
        first = first_error(error)  # every rank refuses together, before any step
        if first:
            raise RolloutServerError(first)
        # The servers start from other weights than the student's. The student's own are known
        # only once the trainer has loaded train.init_from or its resumed checkpoint, which
        # happens after the stage (and this engine) is built: they are pushed before the first
        # rollout, whatever step that is.
        self.synced = False
        self.want_kept = bool(cfg.keep_sampling_mask) and truncates(cfg.sampling)
        self.want_routing = bool(cfg.keep_routing)
        self.probed = not (self.want_kept or self.want_routing)

    async def _check_tokenizers(self) -> None:
        """A server that reports its tokenizer (our server, in /model_info) must serve the
        student's; the refusal names what differs (the first differing token id, the template...).
        Stock SGLang reports none: its tokenizer is the one it was started with (docs/serving.md)."""
        mine = self.tokenizer.fingerprint
        for url, info in self.client.model_infos.items():
            theirs = info.get(wire.INFO_FINGERPRINT)
            if theirs is None or str(theirs) == mine:
                continue
            served = await self.client.tokenizer_description(url)
            what = (
                description_difference(self.tokenizer.describe(), served, ("student", "server"))
                if served is not None and served.fingerprint == theirs
                else digest_difference(self.tokenizer.describe().digest(), info.get(wire.INFO_TOKENIZER_DIGEST) or {}, ("student", "server"))
            )
            raise RolloutServerError(
                f"rollout server {url} serves tokenizer fingerprint {theirs!r} but the student has {mine!r}: {what}; "
                f"start it with the student's tokenizer"
            )

    # -- sampling ---------------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], step: int, *, refill: int = 0) -> Trajectories:
        """Sample `prompts` (collective: every rank calls it with the same step). Seeds are per
        sample id, so a refill batch (other prompts, other ids) draws its own numbers already."""
        if not self.probed:
            self._probe(prompts[0] if prompts else None)
        if not self.synced:
            self.sync_weights(step)
        return broadcast_object(self._request(prompts) if self.is_src else None, self.src, self.group)

    # -- what the run needs of the servers --------------------------------------------------------

    def _params(self, budget: int, seed: int) -> dict:
        # SGLang's sampling mask needs a finite top_k: the vocabulary size keeps every token.
        top_k = self.cfg.top_k or (self.tokenizer.vocab_size if self.want_kept else -1)
        return {
            "max_new_tokens": budget,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "top_k": top_k,
            "min_p": self.cfg.min_p,
            "stop_token_ids": list(self.tokenizer.stop_ids),  # EOS and end-of-turn tokens
            "sampling_seed": seed,
        }

    def _extras(self) -> dict:
        body: dict = {}
        if self.want_kept:
            body["return_sampling_mask"] = True
        if self.want_routing:
            body.update(return_routed_experts=True, routed_experts_start_len=0)
        return body

    def _missing(self, url: str, what: Exception) -> RolloutServerError:
        needs = []
        if self.want_kept:
            needs.append(
                "sampling masks (return_sampling_mask: SGLang 0.5.23 or newer; our server without --plain-sglang; "
                "or set rollout.keep_sampling_mask=false, or sample without truncation: rollout.top_p=1, rollout.top_k=0, "
                "rollout.min_p=0)"
            )
        if self.want_routing:
            needs.append(
                "routed experts (return_routed_experts: start the server with --enable-return-routed-experts, not "
                "--plain-sglang; or set rollout.keep_routing=false)"
            )
        # sglang-router 0.3.2 forwards only the fields it knows, and it knows neither of these.
        router = "; behind an sglang-router, which drops these fields, list the servers themselves in rollout.endpoints"
        return RolloutServerError(f"rollout server at {url} cannot return {' and '.join(needs)}{router}: {what}")

    def _probe(self, prompt: Prompt | None) -> None:
        """One-token requests to every server asking for the extras the run needs (collective:
        every rank raises the same error before any training step)."""
        error = None
        if self.is_src and prompt is not None:
            encoded = encode_prompts([prompt], self.tokenizer)
            body = {"input_ids": encoded, "sampling_params": [self._params(1, 0)], "return_logprob": True, **self._extras()}
            for url in self.cfg.endpoints:
                try:
                    _, (response,) = self._loop.run(self.client.generate_at(body, url))
                    self._decode_extras(url, "probe", encoded[0], response)
                except RolloutServerError as e:
                    error = str(e)
                except RequestRefused as e:  # e.g. a top_k beyond the server's --sampling-mask-max-tokens
                    error = str(self._missing(url, e))
                except Exception as e:  # noqa: BLE001 - raised on every rank below
                    error = f"probing the rollout server at {url}: {type(e).__name__}: {e}"
                if error:
                    break
        first = first_error(error)
        if first:
            raise RolloutServerError(first)
        self.probed = True

    def _decode_extras(self, url: str, sample_id: str, prompt: list[int], response: dict) -> tuple:
        """(kept ids per output token, their selected log-probs, routed experts [rows, moe_layers,
        topk]) of one response; None for what the run does not need."""
        out, meta = list(response["output_ids"]), response["meta_info"]
        where = f"rollout server at {url}, sample {sample_id}"
        kept = routed = None
        try:
            if self.want_kept:
                kept = wire.decode_sampling_masks(meta, out, self.tokenizer.vocab_size, where)
            if self.want_routing:
                model = self.trainer.cfg.model
                rows = wire.decode_routed_experts(meta, len(prompt) + len(out) - 1, model.num_layers, model.moe_topk, where)
                routed = rows[:, model.moe_layers]
                if routed.size and not (0 <= routed.min() and routed.max() < model.num_experts):
                    raise wire.ProtocolError(f"{where}: routed experts outside [0, {model.num_experts}): is it the student's model?")
        except wire.ProtocolError as e:
            raise self._missing(url, e) from None
        return kept, routed

    # -- sampling ---------------------------------------------------------------------------------

    def _request(self, prompts: list[Prompt]) -> Trajectories:
        encoded = encode_prompts(prompts, self.tokenizer)
        budget = min(self.cfg.max_new_tokens, self.max_len - max(len(e) for e in encoded))
        params = [self._params(budget, sample_seed(self.seed, p.sample_id)) for p in prompts]
        body = {"input_ids": encoded, "sampling_params": params, "return_logprob": True, **self._extras()}
        url, responses = self._loop.run(self.client.generate_at(body))
        if len(responses) != len(prompts):
            raise RolloutServerError(f"rollout servers returned {len(responses)} responses for {len(prompts)} prompts")
        rows, logprobs, finish, versions, extras = [], [], [], [], []
        for p, e, r in zip(prompts, encoded, responses):
            out = list(r["output_ids"])
            meta = r["meta_info"]
            reason = (meta.get("finish_reason") or {}).get("type")
            if reason not in ("stop", "length"):
                raise RolloutServerError(f"sample {p.sample_id}: finish_reason {meta.get('finish_reason')!r} (expected stop or length)")
            lps = meta.get("output_token_logprobs") or []
            if len(lps) != len(out) or not 0 < len(out) <= budget:
                raise RolloutServerError(
                    f"sample {p.sample_id}: {len(out)} output tokens with {len(lps)} logprobs (budget {budget})"
                )
            rows.append(e + out)
            logprobs.append([float(entry[0]) for entry in lps])
            finish.append(reason)
            versions.append(str(meta.get("weight_version", "")))
            extras.append(self._decode_extras(url, p.sample_id, e, r))
        batch = pack(rows, [len(e) for e in encoded], prompts, self.tokenizer, self.max_len)
        r = batch.max_response_len
        batch.behavior_logprobs = torch.zeros(len(rows), r)
        for i, lp in enumerate(logprobs):
            batch.behavior_logprobs[i, : len(lp)] = torch.tensor(lp)
        batch.finish_reasons = finish
        if self.want_kept:
            width = max(len(m) for kept, _ in extras for m in kept[0])
            batch.kept_ids = torch.full((len(rows), r, width), -1, dtype=torch.long)
            batch.kept_logprobs = torch.zeros(len(rows), r)
            for i, ((masks, lps), _) in enumerate(extras):
                for j, (mask, lp) in enumerate(zip(masks, lps)):
                    batch.kept_ids[i, j, : len(mask)] = torch.tensor(mask)
                    batch.kept_logprobs[i, j] = lp
        if self.want_routing:
            layers, k = extras[0][1].shape[1:]
            batch.routed_experts = torch.full((len(rows), batch.tokens.shape[1], layers, k), -1, dtype=torch.int32)
            for i, (_, routed) in enumerate(extras):
                batch.routed_experts[i, : routed.shape[0]] = torch.from_numpy(routed)
        stale = [v for v in versions if v != self.version]
        if stale:
            raise RolloutServerError(
                f"{len(stale)} of {len(versions)} samples came from weight_version {sorted(set(stale))}, the trainer "
                f"pushed {self.version!r}: a server missed a weight update"
            )
        batch.weight_version = self.version
        return batch

    # -- weights ----------------------------------------------------------------------------------

    def sync_weights(self, step: int) -> dict[str, float]:
        """Push the current weights to every server: through a checkpoint on disk (every rank
        writes, the first rank tells the servers), or broadcast from trainer rank 0."""
        t0 = time.perf_counter()
        push = None
        if self.cfg.weight_sync == "distributed":
            from megatron.core import parallel_state

            from megatron_opd.models.full_weights import full_state_dict

            # One sender for all replicas (their weights are identical): only replica 0 gathers.
            if parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
                full = full_state_dict(self.trainer.module, parallel_state.get_tensor_model_parallel_group())
                if dist.get_rank() == 0:
                    push = lambda: self._broadcast_weights(full, str(step))  # noqa: E731
        else:
            root = Path(self.trainer.run_dir) / "rollout_weights"
            if dist.get_rank() == 0 and root.is_dir():
                # The servers hold their weights in memory; older exports are never read again. (A
                # resumed run can find newer steps here than the one it writes: keep_last would
                # keep those and drop this one.)
                for old in root.glob("step_*"):
                    if old != ckpt.step_dir(root, step):
                        shutil.rmtree(old, ignore_errors=True)
            path = ckpt.save_checkpoint(root, step, self.trainer.model, None)
            if dist.get_rank() == 0:  # one export and one load per server, whatever the replicas
                from megatron_opd.models.hf.manifest import write_manifest

                # Our server loads only checkpoints whose files match their listed sha256.
                write_manifest(path, "megatron_opd.rollout.sglang weight sync", {"step": step})
                push = lambda: self._load_from_disk(self._export(path, root, step), str(step))  # noqa: E731
        error = None
        if push is not None:
            try:
                push()
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                error = f"{type(e).__name__}: {e}"
        first = first_error(error)
        if first:
            raise RolloutServerError(first)
        self.version, self.synced = str(step), True
        return {"weight_sync_time_s": time.perf_counter() - t0}

    def _export(self, checkpoint: Path, root: Path, step: int) -> str:
        """What the servers load: the checkpoint itself, or its Hugging Face export (any export
        error propagates with its own message)."""
        if self.cfg.weight_format != "hf":
            return str(checkpoint)
        from megatron_opd.models.hf.export import megatron_to_hf

        for old in root.glob("hf_step_*"):  # the servers hold the previous export already
            shutil.rmtree(old, ignore_errors=True)
        out = root / f"hf_step_{step:08d}"
        model_yaml = Path(self.trainer.run_dir) / "model.yaml"
        return str(megatron_to_hf(checkpoint, out, model_config=model_yaml, overwrite=True))

    # -- distributed sync (SGLang's weight-update group; trainer rank 0 is the group's rank 0) --

    def _post_all(self, path: str, bodies: list[dict]):
        """Start one weight-update POST per server on the client's loop; the future's result is
        the replies' messages, or the first refusal with the server's own message."""
        calls = [self.client.admin(url, path, body) for url, body in zip(self.cfg.endpoints, bodies)]
        return self._loop.submit(gather_all(calls))

    def _open_update_group(self, device: torch.device) -> None:
        import socket
        from urllib.parse import urlparse

        from megatron_opd.runtime.distributed import standalone_group
        from megatron_opd.runtime.spawn import free_port

        ranks = self.cfg.server_ranks
        local = all(urlparse(u).hostname in ("127.0.0.1", "localhost", "::1") for u in self.cfg.endpoints)
        address = self.cfg.weight_sync_address or ("127.0.0.1" if local else socket.gethostname())
        backend = "nccl" if device.type == "cuda" else "gloo"
        port, world = free_port(), 1 + ranks * len(self.cfg.endpoints)
        bodies = wire.init_group_bodies(len(self.cfg.endpoints), ranks, address, port, self.group_name, backend)
        replies = self._post_all("/init_weights_update_group", bodies)
        # Joins the rendezvous the servers are joining now; a server that never comes ends in
        # the store's timeout, and its own reply says why.
        self.update_group = standalone_group(backend, address, port, 0, world, timeout_s=120)
        replies.result()

    def _broadcast_weights(self, full: dict[str, torch.Tensor], version: str) -> None:
        from megatron_opd.models.hf.live import hf_from_megatron
        from megatron_opd.runtime.distributed import broadcast_from

        tensors = hf_from_megatron(self.trainer.cfg.model, full)
        device = next(iter(tensors.values())).device
        if self.update_group is None:
            self._open_update_group(device)
        n = len(self.cfg.endpoints)
        self._post_all("/begin_weight_update", [{}] * n).result()
        body = update_body_for(tensors, self.group_name, version)
        replies = self._post_all("/update_weights_from_distributed", [body] * n)
        for tensor in tensors.values():  # in the order of `names`, as the servers receive them
            broadcast_from(self.update_group, tensor.contiguous(), 0)
        replies.result()
        self._post_all("/end_weight_update", [{}] * n).result()

    def _load_from_disk(self, model_path: str, version: str) -> None:
        self._post_all("/update_weights_from_disk", [wire.disk_update_body(model_path, version)] * len(self.cfg.endpoints)).result()

    def close(self) -> None:
        if self.update_group is not None:
            body = [{"group_name": self.group_name}] * len(self.cfg.endpoints)
            try:
                self._post_all("/destroy_weights_update_group", body).result()
            except Exception as e:  # noqa: BLE001 - the servers drop the group when they stop anyway
                print(f"rollout: destroying the weight-update group failed: {e}", flush=True)
            self.update_group = None
        if self.client is not None:
            self._loop.run(self.client.close())
            self._loop.stop()
