"""``lopa serve``: load a checkpoint and serve it over the OpenAI HTTP API with uvicorn.

Model flags (--model, --lora, --device, --dtype) and decoder flags (one per DecodeConfig field, the server's
defaults for every request) come from ``flags.py``; a request
overrides them with its own ``lopa`` field and OpenAI parameters.
"""

from __future__ import annotations

import argparse

from lopa.commands.flags import (
    add_decode_arguments,
    add_dist_arguments,
    add_model_arguments,
    add_threads_argument,
    add_tp_argument,
    apply_threads,
    decode_config_from_args,
    load_llm,
    local_model_arg,
)
from lopa.errors import ConfigError
from lopa.server.limits import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, ServerLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_threads_argument(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 = all)")
    group.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    group.add_argument("--served-model-name", default=None, help="model id clients send (default: checkpoint name)")
    group.add_argument(
        "--queue-limit",
        type=int,
        default=64,
        help="prompts that may wait for the engine (a request's prompts count one each); more get 503 (default: 64)",
    )
    group.add_argument(
        "--max-prompts-per-request",
        type=int,
        default=ServerLimits.max_prompts_per_request,
        help="prompts one /v1/completions request may carry; more get 400 "
        f"(default: {ServerLimits.max_prompts_per_request})",
    )
    group.add_argument(
        "--max-body-bytes", type=int, default=1 << 20, help="largest request body; more gets 413 (default: 1 MiB)"
    )
    group.add_argument(
        "--max-branches",
        type=int,
        default=ServerLimits.max_branches,
        help=f"largest lopa.branches a request may ask for; more gets 400 (default: {ServerLimits.max_branches})",
    )
    group.add_argument(
        "--max-kv-cache-mb",
        type=int,
        default=ServerLimits.max_kv_cache_mb,
        help="largest KV cache one request may need (branch rows x (prompt + max_new_tokens) positions, summed "
        "over its prompts), in MiB; "
        f"more gets 400 (default: {ServerLimits.max_kv_cache_mb})",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open connections; over it the one waiting longest for its request headers is closed "
        "(default: ulimit -n less 64, at most 4096)",
    )
    group.add_argument(
        "--header-timeout",
        type=float,
        default=HEADER_TIMEOUT_S,
        help=f"seconds a connection has to send a request's headers (default: {HEADER_TIMEOUT_S:g})",
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT_S,
        help=f"seconds a request has to send its whole body; later gets 408 (default: {BODY_TIMEOUT_S:g})",
    )
    group.add_argument(
        "--api-docs",
        action="store_true",
        help="serve FastAPI's /docs and /redoc pages (their scripts load from a CDN; default: off)",
    )
    group.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn log"
    )
    dist = parser.add_argument_group("mesh (tensor / branch parallelism, one sequence at a time)")
    dist.add_argument("--bp", type=int, default=1, metavar="M", help="branch groups (default: 1)")
    add_tp_argument(dist)
    add_dist_arguments(dist)
    add_decode_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError("lopa serve needs the server extras; install them with: pip install 'lopa[serve]'") from e
    from lopa.server.app import create_app
    from lopa.server.guard import uvicorn_options

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_connections is not None and args.max_connections < 1:
        raise ConfigError(f"--max-connections must be >= 1, got {args.max_connections}")
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not value > 0:  # also refuses nan
            raise ConfigError(f"{flag} must be > 0 seconds, got {value}")
    config = decode_config_from_args(args)
    apply_threads(args)
    if args.tp > 1 or args.bp > 1:  # this process becomes rank 0 of a mesh; the other ranks start here
        from lopa.parallel.serving import start_serving_mesh

        llm = start_serving_mesh(
            local_model_arg(args), tp=args.tp, bp=args.bp, lora=args.lora, device=args.device, dtype=args.dtype,
            timeout_s=args.dist_timeout, port=args.dist_port,
        )  # fmt: skip
    else:
        llm = load_llm(args)
    app = create_app(
        llm,
        default_config=config,
        queue_limit=args.queue_limit,
        max_body_bytes=args.max_body_bytes,
        served_model_name=args.served_model_name,
        limits=ServerLimits(args.max_branches, args.max_kv_cache_mb, args.max_prompts_per_request),
        api_docs=args.api_docs,
        body_timeout_s=args.body_timeout,
    )
    url = f"http://{args.host}:{args.port}"
    print(f"serving {args.served_model_name or llm.model_name} on {url}/v1 ({config.decoder}); live view: {url}/")
    if getattr(llm, "can_batch", False):  # a tensor- or branch-parallel mesh decodes one sequence at a time
        mib = llm.kv_pool_bytes() / 2**20
        print(
            f"batching up to {llm.max_num_seqs} sequences; "
            f"KV pool {llm.max_num_seqs} x {llm.max_context} positions = {mib:.1f} MiB"
        )
    # on Ctrl+C, give running requests 5 s, then cancel them (their generations stop within one forward)
    limits = uvicorn_options(args.max_connections, args.header_timeout)  # slow clients: guard.py
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5, **limits)
    return 0
