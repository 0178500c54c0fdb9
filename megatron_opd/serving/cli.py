"""The server's command line: `megatron-opd serve` (alias `serve-teacher`) or `python -m megatron_opd.serving`.

    python -m megatron_opd.serving --model-dir DIR [--host 127.0.0.1] [--port 30000]
    python -m megatron_opd.serving --random-init --model-config model.yaml --tokenizer DIR

A megatron-core model behind SGLang's HTTP protocol, as a teacher (scoring: input logprobs,
top-k, hidden states) or a rollout server (sampling with the one sampler, weight updates).
Weight updates are administrative and off unless asked for: --weights-dir DIR (disk updates, only
manifest-checked checkpoints inside DIR) and --weight-groups (trainers' weight-update groups); a
server that takes updates and binds beyond 127.0.0.1 needs --api-key (serving/weights.py).
Extensions (ignored by SGLang, off with --plain-sglang so the server stands in for a stock one):
`return_binary_signal` (our binary form, docs/teachers.md), `return_full_logprobs` (full
log-softmax rows, the `logits` signal), and the model identity keys of /model_info; --plain-sglang
also ignores `return_sampling_mask`, like an SGLang that does not know it. The RL extras follow
SGLang's flags: `return_routed_experts` only with --enable-return-routed-experts (MoE models),
sampling masks up to --sampling-mask-max-tokens kept ids.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

DEFAULT_WEIGHT_VERSION = "default"  # SGLang's --weight-version default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default="", help="model directory (model.yaml, tokenizer.json, checkpoints/)")
    p.add_argument("--checkpoint", default="", help="a checkpoint dir to load instead of the model dir's newest")
    p.add_argument("--random-init", action="store_true", help="random weights (smoke tests); with --model-dir or --model-config/--tokenizer")
    p.add_argument("--model-config", default="", help="ModelConfig YAML, with --random-init")
    p.add_argument("--tokenizer", default="", help="tokenizer directory or file, with --random-init")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="0 picks a free port (printed in the ready line)")
    p.add_argument("--api-key", default="", help="require Authorization: Bearer <key> (not on /health*)")
    p.add_argument("--api-key-env", default="", metavar="NAME", help="like --api-key, the key read from $NAME (kept out of ps)")
    p.add_argument("--api-key-file", default="", metavar="PATH", help="like --api-key, the key read from a file")
    p.add_argument("--weight-version", default=DEFAULT_WEIGHT_VERSION)
    p.add_argument(
        "--hidden-states-layout", choices=["rows", "block"], default="rows",
        help="JSON hidden_states as 1-D rows (SGLang's contract type) or a 2-D prefill block then rows (its source)",
    )  # fmt: skip
    p.add_argument("--plain-sglang", action="store_true", help="no extensions: behave like a stock SGLang server")
    p.add_argument(
        "--enable-return-routed-experts", action="store_true",
        help="answer return_routed_experts (SGLang's flag; MoE models): the experts of every MoE layer per position",
    )  # fmt: skip
    p.add_argument(
        "--sampling-mask-max-tokens", type=int, default=4096,
        help="the largest kept set return_sampling_mask may return (SGLang's flag): it needs top_k=1 or 1 < top_k <= this",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g = p.add_argument_group("weight updates and limits")
    g.add_argument(
        "--weights-dir", default="",
        help="the only directory /update_weights_from_disk loads from (checkpoints with a manifest.json); none: no disk updates",
    )  # fmt: skip
    g.add_argument(
        "--weight-groups", action="store_true",
        help="join trainers' weight-update groups (/init_weights_update_group, /update_weights_from_distributed, ...)",
    )  # fmt: skip
    g.add_argument("--weight-group-timeout-s", type=float, default=120.0, help="time limit to join a weight-update group (and per broadcast)")
    g.add_argument("--max-batch-size", type=int, default=512, help="sequences per /generate request")
    g.add_argument("--max-request-tokens", type=int, default=65536, help="input plus max_new_tokens, summed over a request")
    g.add_argument("--max-body-mb", type=float, default=64.0, help="request body size in MiB (413 beyond)")
    g.add_argument("--health-timeout-s", type=float, default=20.0, help="/health answers 503 when the model thread is stuck this long")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: reachable from wherever it resolves
        return False


def resolve_api_key(args: argparse.Namespace) -> str | None:
    """Read --api-key-env / --api-key-file into `args.api_key`; why that failed, or None."""
    from megatron_opd.runtime.secrets import SecretError, read_api_key

    if sum(map(bool, (args.api_key, args.api_key_env, args.api_key_file))) > 1:
        return "give one of --api-key, --api-key-env, --api-key-file"
    if not args.api_key:
        try:
            args.api_key = read_api_key(args.api_key_env, args.api_key_file, prefix="")
        except SecretError as e:
            return str(e)
    return None


def check_arguments(args: argparse.Namespace) -> str | None:
    """Why the server must not start with `args` (its key already resolved), or None."""
    if (args.weights_dir or args.weight_groups) and not is_loopback(args.host) and not args.api_key:
        return (
            f"--host {args.host} makes the server reachable beyond this machine, and its weight updates "
            f"(--weights-dir, --weight-groups) replace the model: give --api-key (clients send it as a Bearer "
            f"token), or bind --host 127.0.0.1"
        )
    for flag in ("weight_group_timeout_s", "max_batch_size", "max_request_tokens", "max_body_mb", "health_timeout_s",
                 "sampling_mask_max_tokens"):  # fmt: skip
        if getattr(args, flag) <= 0:
            return f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}"
    return None


def serve_command(args: argparse.Namespace) -> int:
    from megatron_opd.serving.app import AppOptions, HttpThread, MainThreadWorker, build_app
    from megatron_opd.serving.backend import ModelBackend, ModelSource
    from megatron_opd.serving.weights import WeightUpdates

    refusal = resolve_api_key(args) or check_arguments(args)
    if refusal:
        print(f"serve: {refusal}", file=sys.stderr, flush=True)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    source = ModelSource(args.model_dir, args.checkpoint, args.random_init, args.model_config, args.tokenizer, args.seed)
    backend = ModelBackend.load(source, weight_version=args.weight_version, routed_experts=args.enable_return_routed_experts)
    options = AppOptions(
        api_key=args.api_key,
        plain_sglang=args.plain_sglang,
        hidden_states_layout=args.hidden_states_layout,
        tokenizer_path=args.model_dir or args.tokenizer or "",
        max_batch_size=args.max_batch_size,
        max_request_tokens=args.max_request_tokens,
        sampling_mask_max_tokens=args.sampling_mask_max_tokens,
        routed_experts=args.enable_return_routed_experts,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        health_timeout_s=args.health_timeout_s,
    )
    updates = WeightUpdates(
        backend, weights_dir=args.weights_dir or None, groups=args.weight_groups, group_timeout_s=args.weight_group_timeout_s
    )
    worker = MainThreadWorker()
    state = {"stopping": False}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    http = HttpThread(build_app(backend, updates, worker, options, state), args.host, args.port)
    http.start()
    http.ready.wait()
    if http.error is not None:
        print(f"serve: cannot listen on {args.host}:{args.port}: {http.error}", file=sys.stderr, flush=True)
        return 1
    cfg = backend.cfg
    print(
        f"teacher server ready at http://{args.host}:{http.port} (model {backend.model_path}, vocab {cfg.vocab_size}, "
        f"hidden {cfg.hidden_size}, weight_version {backend.weight_version}{', plain sglang' if args.plain_sglang else ''})",
        flush=True,
    )
    worker.run_until(stop, http)
    state["stopping"] = True
    http.stop()
    updates.close()
    if not stop.is_set():  # the HTTP thread died on its own
        print(f"serve: the HTTP server stopped unexpectedly: {http.error}", file=sys.stderr, flush=True)
        return 1
    print("teacher server stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import warnings

    # Import-time notices of GPU stacks that are absent by design on CPU.
    for pattern in ("pynvml", "Apex", "Transformer Engine", "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    parser = argparse.ArgumentParser(prog="megatron-opd serve", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return serve_command(parser.parse_args(argv))
