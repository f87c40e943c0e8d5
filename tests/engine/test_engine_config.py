"""EngineConfig and ServerConfig: resolution, validation, the rank spec round trip, and flags generated from them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lopa.commands.flags import (
    add_model_arguments,
    add_server_arguments,
    engine_config_from_args,
    server_config_from_args,
)
from lopa.config import DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_NUM_SEQS, EngineConfig, ServerConfig
from lopa.errors import BatchingError, ConfigError


def test_resolve_fills_the_device_batch_size_and_the_model_context() -> None:
    cpu = EngineConfig().resolve("cpu", context=100_000)
    assert (cpu.max_num_seqs, cpu.max_model_len) == (DEFAULT_MAX_NUM_SEQS["cpu"], DEFAULT_MAX_MODEL_LEN)
    cuda = EngineConfig(max_model_len=64).resolve("cuda", context=128)
    assert (cuda.max_num_seqs, cuda.max_model_len) == (DEFAULT_MAX_NUM_SEQS["cuda"], 64)
    assert EngineConfig().resolve("cpu", context=300).max_model_len == 300  # capped by the model
    with pytest.raises(ConfigError, match=r"max_model_len must be an integer in \[1, 128\]"):
        EngineConfig(max_model_len=129).resolve("cpu", context=128)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1"),
        ({"tp": 0}, "--bp and --tp must be positive"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"dist_timeout": -1.0}, "dist_timeout must be a number of seconds > 0"),
    ],
)
def test_bad_engine_settings_are_named(changes: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        EngineConfig(**changes).validate()


def test_a_mesh_refuses_a_batch_size_by_name() -> None:
    EngineConfig(tp=2, max_num_seqs=1).validate()
    with pytest.raises(BatchingError, match="one sequence at a time"):
        EngineConfig(bp=2, max_num_seqs=4).validate()


def test_the_rank_spec_round_trips_and_refuses_unknown_keys() -> None:
    cfg = EngineConfig(model="/ckpt", dtype="bfloat16", tp=2, bp=2, dist_timeout=5.0, dist_port=1234)
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown engine setting"):
        EngineConfig.from_dict({**cfg.to_dict(), "shard": 1})


def test_flags_left_out_are_the_config_defaults() -> None:
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    add_server_arguments(p)
    args = p.parse_args([])
    assert engine_config_from_args(args) == EngineConfig()
    assert server_config_from_args(args) == ServerConfig()
    given = p.parse_args(["--max-num-seqs", "3", "--dtype", "float16", "--enforce-eager", "--port", "9", "--api-docs"])
    assert engine_config_from_args(given) == EngineConfig(max_num_seqs=3, dtype="float16", enforce_eager=True)
    assert server_config_from_args(given) == ServerConfig(port=9, api_docs=True)
    for f in dataclasses.fields(ServerConfig):  # every server setting has a flag and a help text
        assert f.metadata["help"] and hasattr(args, f.name)


def test_bad_server_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="queue_limit must be an integer >= 1"):
        ServerConfig(queue_limit=0).validate()
    with pytest.raises(ConfigError, match="--body-timeout must be > 0 seconds"):
        ServerConfig(body_timeout=float("nan")).validate()


def test_every_engine_declares_the_whole_protocol() -> None:
    from lopa.engine.protocol import Engine
    from lopa.llm import LLM
    from lopa.parallel.replicated_llm import BranchParallelLLM
    from lopa.testing.fake_llm import FakeLLM

    names = {n for n in dir(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    for cls in (LLM, BranchParallelLLM, FakeLLM):
        assert Engine in cls.__mro__  # declared, not just matching by shape
    assert not [n for n in names if not hasattr(BranchParallelLLM, n)]  # explicit: no __getattr__ forwarding
    assert "__getattr__" not in vars(BranchParallelLLM)
    fake = FakeLLM(lambda prompt: "42")
    assert isinstance(fake, Engine) and not [n for n in names if not hasattr(fake, n)]
