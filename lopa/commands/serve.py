"""``lopa serve``: load a checkpoint and serve it over the OpenAI HTTP API with uvicorn.

Model flags (--model, --lora, --device, --dtype) and decoder flags (one per DecodeConfig field, the server's
defaults for every request) come from ``flags.py``; a request
overrides them with its own ``lopa`` field and OpenAI parameters.
"""

from __future__ import annotations

import argparse

from lopa.commands.flags import (
    add_config_arguments,
    add_decode_arguments,
    add_model_arguments,
    add_server_arguments,
    add_threads_argument,
    apply_threads,
    decode_config_from_args,
    engine_config_from_args,
    load_llm,
    local_model_arg,
    server_config_from_args,
)
from lopa.config import EngineConfig
from lopa.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_threads_argument(parser)
    add_server_arguments(parser.add_argument_group("server (ServerConfig)"))
    mesh = parser.add_argument_group("mesh (tensor / branch parallelism, one sequence at a time)")
    add_config_arguments(mesh, EngineConfig, ("bp", "tp", "dist_timeout", "dist_port"))
    add_decode_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError("lopa serve needs the server extras; install them with: pip install 'lopa[serve]'") from e
    from lopa.server.app import create_app
    from lopa.server.guard import uvicorn_options

    server = server_config_from_args(args)
    config = decode_config_from_args(args)
    apply_threads(args)
    engine = engine_config_from_args(args)
    if engine.world_size > 1:  # this process becomes rank 0 of a mesh; the other ranks start here
        from lopa.parallel.serving import start_serving_mesh

        llm = start_serving_mesh(engine.replace(model=local_model_arg(args), revision=None))
    else:
        llm = load_llm(args)
    app = create_app(llm, default_config=config, server=server)
    url = f"http://{server.host}:{server.port}"
    print(f"serving {server.served_model_name or llm.model_name} on {url}/v1 ({config.decoder}); live view: {url}/")
    if llm.can_batch:  # a tensor- or branch-parallel mesh decodes one sequence at a time
        mib, seqs = llm.kv_pool_bytes() / 2**20, llm.engine_config.max_num_seqs
        print(f"batching up to {seqs} sequences; KV pool {seqs} x {llm.max_context} positions = {mib:.1f} MiB")
    # on Ctrl+C, give running requests 5 s, then cancel them (their generations stop within one forward)
    limits = uvicorn_options(server.max_connections, server.header_timeout)  # slow clients: guard.py
    uvicorn.run(
        app, host=server.host, port=server.port, log_level=server.log_level, timeout_graceful_shutdown=5, **limits
    )
    return 0
