"""The embedded rollout engine: the student's own megatron model samples in-job, under TP.

Every rank of a tensor-parallel group runs the same forward on the same prompts; the
vocab-parallel logits of the last position are gathered (one [batch, V] row per token, never
[batch, seq, V]), the TP group's first rank samples with the one sampler (rollout/sampler.py), and
the chosen tokens are broadcast, so all ranks of the group extend the same sequences. Each
data-parallel replica samples its own prompts.

Two ways to get the next-token logits, selected by `kv_cache` (`rollout.kv_cache`, default true):
- KV cache (`_CachedForward`): megatron-core's own `StaticInferenceContext`, passed to
  `GPTModel.forward(..., inference_context=...)`; each attention layer appends its keys and values
  to the context's buffers at `sequence_len_offset`. Prompts of different lengths are
  *left-padded* to a common end and the pad keys are masked by an explicit attention mask
  ([b, 1, q, k], True = masked), so at step j every row predicts its own response token j and
  one forward of one new token per row serves the whole batch: a step of B rows of prompt P and
  response L costs B*(P + L - 1) forward tokens instead of B*(L*P + L(L-1)/2). RoPE is relative,
  so the per-row shift the left padding introduces changes scores only by float rounding.
  Rows that finish are dropped from the cache (its buffers are re-indexed), as the no-cache path
  drops them from its forward.
  Why not Megatron's own controller (text_generation_controllers): it decodes from the *shortest*
  prompt and forces prompt tokens for rows still inside their prompt, so at one decode step rows
  sample different response indices. Our sampler draws from one `torch.Generator` per batch;
  the order of its draws (step j: every active row's token j, in row order) is what today's
  seeds produce, and left padding keeps exactly that order, so cached and uncached rollouts
  (and a resumed run) sample the same tokens.
- no cache (`_PrefixForward`): each new token re-runs every active row's prefix, right-padded.
  The reference the cache is tested against; also the fallback where the cache would not be
  exact (see `_cache_unsupported`: attention kernels that ignore an explicit mask after the first
  step, such as Transformer Engine's, when prompt lengths differ).

MoE students under expert parallelism: the experts' all-to-alls join the ranks of an EP group,
which belong to different data-parallel replicas generating different prompts. Their generation
loops run in lockstep (one flag all-reduced per step over the EP group): a replica that has
finished runs an idle one-token forward until every replica has, so no rank waits forever on an
all-to-all its peer never joins.

Kept sets (keep sampling mask, GRPO; notes/opd-math.md section 5). With `record_kept` (default:
when the sampling parameters truncate, i.e. top_p < 1, top_k > 0 or min_p > 0, not greedy) the
returned `Trajectories` also holds
- `kept_ids` [B, R, K] long: at each response position the token ids the sampler could have
  drawn, most probable first, -1 padded, K = the largest kept set in the batch; -1 beyond each
  row's response. The sampler's own sets (its `return_kept`), never a dense [B, R, V] mask.
- `kept_logprobs` [B, R] float32: each response token's log-probability renormalised over its
  kept set, log q(a) - log sum_{a' in S} q(a'), with q the distribution `behavior_logprobs`
  comes from: the log-probability of the truncated distribution the token was actually drawn
  from (what GRPO's ratio needs as the old policy once it renormalises pi_theta over `kept_ids`
  with `vocab_parallel_logprobs(..., temperature=T, kept_ids=...)`).
`behavior_logprobs` [B, R] stays what SGLang reports: log_softmax(logits / T) of the token,
*before* top-k/top-p/min-p (greedy: log_softmax(logits)). When the sampler keeps the whole
vocabulary, both kept fields are None (renormalising over everything changes nothing).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from megatron_opd.data.prompts import Prompt, encode_prompts
from megatron_opd.data.tokenizer import Tokenizer
from megatron_opd.data.trajectories import Trajectories, pack
from megatron_opd.models.routing import recording
from megatron_opd.rollout.config import SamplingParams
from megatron_opd.rollout.sampler import filters, is_greedy, kept_set_logprobs, reported_logprobs, sample, stops, token_logprobs


def truncates(params: SamplingParams) -> bool:
    """Whether sampling with `params` draws from a truncated distribution (top-k, top-p, min-p),
    i.e. whether GRPO's keep-sampling-mask has anything to keep. Greedy is not sampling."""
    return filters(params) and not is_greedy(params)


class _PrefixForward:
    """No cache: every step re-runs the whole (right-padded) prefix of each active row."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, device: torch.device):
        self.model, self.vocab_size, self.device = model, vocab_size, device
        self.first = True
        self.fed: torch.Tensor | None = None  # [n, s] the token position of each input column, -1: none

    def logits(self, tokens: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel

        # Causal attention: the pads right of a shorter row never reach its last position.
        cur = int(lengths[active].max())
        inputs = tokens[active, :cur].to(self.device)
        positions = torch.arange(cur, device=self.device).expand_as(inputs)
        # Positions fed for the first time (the prompt, then each row's newest token); -1: a pad
        # or a position whose routing an earlier step recorded.
        column = torch.arange(cur)[None, :]
        newest = column < lengths[active, None] if self.first else column == lengths[active, None] - 1
        self.fed = torch.where(newest, column.expand(len(active), cur), -1)
        self.first = False
        logits = self.model(inputs, positions, None)  # [n, cur, V/tp]
        last = logits[torch.arange(len(active)), lengths[active].to(self.device) - 1]  # [n, V/tp]
        # Sampling and bookkeeping stay on the CPU: one [n, V] row per token is cheap to move.
        full = tensor_parallel.gather_from_tensor_model_parallel_region(last)
        return full[:, : self.vocab_size].float().cpu()


class _CachedForward:
    """megatron-core's static KV cache over left-padded prompts (see the module docstring)."""

    def __init__(
        self, model: torch.nn.Module, prompt_lens: list[int], budget: int, vocab_size: int, pad_id: int, device: torch.device
    ):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model, self.vocab_size, self.pad_id, self.device = model, vocab_size, pad_id, device
        self.width = max(prompt_lens)  # the column every prompt ends at
        self.pads = self.width - torch.tensor(prompt_lens)  # left pads of each row
        # The last sampled token is never fed back: width + budget - 1 columns are ever written.
        self.context = StaticInferenceContext(len(prompt_lens), self.width + budget - 1)
        self.slots = torch.arange(len(prompt_lens))  # the batch row each cache slot holds
        self.fed: torch.Tensor | None = None  # [n, s] the token position of each input column, -1: a pad

    def logits(self, tokens: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if ctx.sequence_len_offset == 0:  # prefill: every row's whole prompt, ending at column width-1
            column = torch.arange(self.width)
            source = (column[None, :] - self.pads[active, None]).clamp(min=0)  # [n, width]
            is_pad = column[None, :] < self.pads[active, None]
            inputs = tokens[active[:, None], source].masked_fill(is_pad, self.pad_id)
            positions = source
            self.fed = source.masked_fill(is_pad, -1)
            causal = column[None, :] > column[:, None]  # [q, k]
            mask = causal[None] | is_pad[:, None, :]  # [n, q, k]
        else:  # decode: the token sampled last step, one column per row
            if not torch.equal(self.slots, active):
                self._keep(active)
            inputs = tokens[active, lengths[active] - 1][:, None]
            positions = (lengths[active] - 1)[:, None]
            self.fed = positions
            keys = torch.arange(ctx.sequence_len_offset + 1)
            mask = (keys[None, :] < self.pads[active, None])[:, None, :]  # [n, 1, k]
        logits = self.model(
            inputs.to(self.device),
            positions.to(self.device),
            mask[:, None].to(self.device),  # [n, 1, q, k], True = masked
            inference_context=ctx,
            runtime_gather_output=True,  # megatron gathers the vocab-parallel logits itself
        )  # [n, 1, V_padded]: the context materialises the last column only
        ctx.increment_sequence_len_offset(inputs.shape[1])
        ctx.enable_decode_mode()
        return logits[:, -1, : self.vocab_size].float().cpu()

    def _keep(self, active: torch.Tensor) -> None:
        """Drop the cache slots of finished rows (`active` is a subset of `slots`, in order)."""
        index = torch.searchsorted(self.slots, active)
        ctx = self.context
        for layer, (key, value) in ctx.key_value_memory_dict.items():
            i = index.to(key.device)
            ctx.key_value_memory_dict[layer] = (key[:, i], value[:, i])
        ctx.max_batch_size = len(active)
        self.slots = active.clone()


def _cache_unsupported(model: torch.nn.Module, prompt_lens: list[int]) -> str:
    """Why the KV cache would not reproduce the no-cache logits for this model and batch ("": it does)."""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if len(set(prompt_lens)) == 1:
        return ""  # no padding: causal prefill and unmasked decode are exact with any kernel
    for module in model.modules():
        # megatron switches the mask type to no_mask after the first step; only the local
        # DotProductAttention (self- and multi-latent attention) still applies the explicit
        # mask that hides the left pads.
        if isinstance(module, Attention) and not isinstance(module.core_attention, DotProductAttention):
            return (
                f"{type(module.core_attention).__name__} ignores the padding mask after the first step "
                "and the prompts differ in length"
            )
    return ""


def _lockstep_group():
    """The group whose ranks' forwards must be paired (MoE all-to-alls across replicas), or None."""
    from megatron.core import parallel_state

    if parallel_state.get_expert_model_parallel_world_size() > 1:
        return parallel_state.get_expert_model_parallel_group()
    return None


def _idle_forward(model: torch.nn.Module, pad_id: int, device: torch.device) -> None:
    """One pad token through the model: joins the peers' collectives, produces nothing used."""
    token = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    model(token, torch.zeros_like(token), None)


def _any_rank(flag: bool, group) -> bool:
    if group is None:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _broadcast_kept(kept: torch.Tensor | None, rows: int, src: int, group) -> torch.Tensor:
    """The TP source's kept sets [rows, K] on every rank of the group (K travels first)."""
    width = torch.tensor([kept.shape[1] if kept is not None else 0])
    dist.broadcast(width, src=src, group=group)
    if kept is None:
        kept = torch.empty(rows, int(width), dtype=torch.long)
    dist.broadcast(kept, src=src, group=group)
    return kept


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[Prompt],
    tokenizer: Tokenizer,
    params: SamplingParams,
    *,
    max_len: int,
    generator: torch.Generator | None = None,
    kv_cache: bool = True,
    record_kept: bool | None = None,
    record_routing: bool = False,
    ignore_eos: bool = False,
) -> Trajectories:
    """Sample a response for each prompt; returns the batch with the sampler's log-probs.

    Collective over the tensor-parallel group (every rank passes the same prompts), and over the
    expert-parallel group for MoE students with EP > 1 (each rank its own replica's prompts).
    `kv_cache`: megatron's static KV cache (O(length) forward tokens) or the prefix re-run;
    both sample the same tokens from the same `generator`. `record_kept`: also return the kept
    sets (`kept_ids`, `kept_logprobs`); None records them when `params` truncate.
    `record_routing` (keep routing, MoE models built with routing replay): also return the experts
    every MoE layer chose for every token fed, `routed_experts` [B, T, moe_layers, topk] int32 (-1:
    not fed), from the prefill and every decode step. `ignore_eos`: EOS does not end a row
    (SGLang's ignore_eos; the benchmark's fixed response lengths). An empty `prompts` list returns
    an empty batch; under EP lockstep the replica still joins its peers' forwards, so callers can
    make every replica call `generate` the same number of times.
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError(
            "the embedded rollout engine runs with parallel.pp=1; use the SGLang rollout engine for PP>1"
        )
    if getattr(getattr(model, "config", None), "sequence_parallel", False):
        raise NotImplementedError(
            "the embedded rollout engine runs with parallel.sequence_parallel=false (a one-token step "
            "cannot be split across TP ranks); use the SGLang rollout engine, or turn sequence parallelism off"
        )
    if not prompts:
        return _idle_generate(model, tokenizer)
    encoded = encode_prompts(prompts, tokenizer)
    prompt_lens = [len(e) for e in encoded]
    longest = max(range(len(prompts)), key=lambda i: prompt_lens[i])
    budget = min(params.max_new_tokens, max_len - prompt_lens[longest])
    if budget < 1:
        raise ValueError(
            f"prompt {prompts[longest].sample_id!r} has {prompt_lens[longest]} tokens and leaves no room for a "
            f"response under model.max_seq_len={max_len}; raise model.max_seq_len or shorten the prompts"
        )
    record = truncates(params) if record_kept is None else record_kept
    record = record and filters(params)  # a sampler that keeps the whole vocabulary has no kept set
    device = next(model.parameters()).device
    vocab = tokenizer.vocab_size
    if kv_cache and (reason := _cache_unsupported(model, prompt_lens)):
        warnings.warn(f"rollout KV cache off for this batch ({reason}); re-running prefixes instead")
        kv_cache = False
    if kv_cache:
        forward = _CachedForward(model, prompt_lens, budget, vocab, tokenizer.pad_id, device)
    else:
        forward = _PrefixForward(model, vocab, device)
    was_training = model.training
    model.eval()
    b = len(prompts)
    routed = None  # [b, width, moe_layers, topk] once the first forward has recorded
    tokens = torch.full((b, prompt_lens[longest] + budget), tokenizer.pad_id, dtype=torch.long)
    for i, e in enumerate(encoded):
        tokens[i, : len(e)] = torch.tensor(e)
    lengths = torch.tensor(prompt_lens)
    logprobs = torch.zeros(b, budget)
    kept_steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, kept ids, kept log-probs)
    done = torch.zeros(b, dtype=torch.bool)
    finish = ["length"] * b
    group = parallel_state.get_tensor_model_parallel_group()
    src = parallel_state.get_tensor_model_parallel_src_rank()
    tp = dist.get_world_size(group)
    lockstep = _lockstep_group()
    eos_id = None if ignore_eos else tokenizer.eos_id
    end_ids = () if ignore_eos else tokenizer.stop_ids  # EOS and end-of-turn tokens (HF generation_config)
    try:
        with recording(model, record_routing) as recorder:
            j = 0
            while _any_rank(j < budget and not bool(done.all()), lockstep):
                if j >= budget or bool(done.all()):
                    _idle_forward(model, tokenizer.pad_id, device)
                    if recorder is not None:
                        recorder.take(1, 1)  # an idle forward's routing belongs to no row
                    j += 1
                    continue
                active = (~done).nonzero().flatten()
                logits = forward.logits(tokens, lengths, active)
                if recorder is not None:
                    routed = _store_routing(routed, recorder, forward.fed, active, tuple(tokens.shape))
                # The TP source samples (rollout/sampler.py, SGLang's rules); every rank then takes the
                # reported log-probability of the broadcast tokens from the same gathered logits.
                choice = torch.zeros(len(active), dtype=torch.long)
                kept = None
                if dist.get_rank() == src:
                    result = sample(logits, params, generator, return_kept=record)
                    choice, kept = result.tokens, result.kept_ids
                if tp > 1:
                    dist.broadcast(choice, src=src, group=group)
                    if record:
                        kept = _broadcast_kept(kept, len(active), src, group)
                logprobs[active, j] = token_logprobs(logits, choice, params)
                if record:
                    kept_steps.append((active, kept, kept_set_logprobs(reported_logprobs(logits, params), choice, kept)))
                tokens[active, lengths[active]] = choice
                lengths[active] += 1
                for a, c in zip(active.tolist(), choice.tolist()):
                    if stops(c, params, eos_id) or c in end_ids:
                        done[a] = True
                        finish[a] = "stop"
                j += 1
    finally:
        model.train(was_training)
    rows = [tokens[i, : lengths[i]].tolist() for i in range(b)]
    batch = pack(rows, prompt_lens, prompts, tokenizer, max_len)
    r = batch.max_response_len
    in_response = torch.arange(r) < batch.response_lens[:, None]
    batch.behavior_logprobs = logprobs[:, :r] * in_response
    batch.finish_reasons = finish
    if record:
        width = max(k.shape[1] for _, k, _ in kept_steps)
        batch.kept_ids = torch.full((b, r, width), -1, dtype=torch.long)
        batch.kept_logprobs = torch.zeros(b, r)
        for step, (active, kept, kept_lp) in enumerate(kept_steps):
            batch.kept_ids[active, step, : kept.shape[1]] = kept
            batch.kept_logprobs[active, step] = kept_lp
    if routed is not None:
        batch.routed_experts = torch.full((b, batch.tokens.shape[1], *routed.shape[2:]), -1, dtype=torch.int32)
        batch.routed_experts[:, : routed.shape[1]] = routed
    return batch


def _store_routing(routed, recorder, fed: torch.Tensor, active: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Put the last forward's routing (its input [n, s] columns at token positions `fed`, -1: a
    pad or already recorded) into `routed` [b, width, moe_layers, topk] (allocated on first use;
    `shape` is (b, width))."""
    n, s = fed.shape
    step = recorder.take(s, n)  # [n, s, moe_layers, topk]
    if routed is None:
        routed = torch.full((*shape, *step.shape[2:]), -1, dtype=torch.int32)
    rows, cols = (fed >= 0).nonzero(as_tuple=True)
    routed[active[rows], fed[rows, cols]] = step[rows, cols]
    return routed


def _idle_generate(model: torch.nn.Module, tokenizer: Tokenizer) -> Trajectories:
    """`generate` of no prompts: under EP lockstep, idle forwards until the peers have finished."""
    lockstep = _lockstep_group()
    if lockstep is not None:
        was_training = model.training
        model.eval()
        try:
            while _any_rank(False, lockstep):
                _idle_forward(model, tokenizer.pad_id, next(model.parameters()).device)
        finally:
            model.train(was_training)
    empty = torch.zeros(0, dtype=torch.long)
    return Trajectories(tokens=torch.zeros(0, 1, dtype=torch.long), lengths=empty, prompt_lens=empty, domain=[], sample_ids=[])


def responses(batch: Trajectories, tokenizer: Tokenizer) -> list[str]:
    """The decoded response of each row (up to its EOS)."""
    return [tokenizer.decode(row[p:n]) for row, p, n in zip(batch.tokens.tolist(), batch.prompt_lens.tolist(), batch.lengths.tolist())]
