"""The Python API and the CLI start from the same effective defaults; the README's install and example hold."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lopa import LLM, DecodeConfig
from lopa.commands.flags import decode_config_from_args
from lopa.commands.main import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
RECOMMENDS = {"decoder": "threshold", "block_size": 8, "max_new_tokens": 24, "threshold": 0.8}


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with recommended decoding settings that differ from the engine defaults."""
    path = Path(shutil.copytree(tiny_ckpt, tmp_path_factory.mktemp("recommends") / "ckpt"))
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **RECOMMENDS}))
    return path


def test_api_and_cli_build_the_same_config(ckpt: Path) -> None:
    llm = LLM(ckpt)
    argv = ["generate", "--model", str(ckpt), "--decoder", "lopa", "--branches", "2", "x"]
    from_cli = decode_config_from_args(build_parser(argv).parse_args(argv))
    from_api = llm.decode_config(decoder="lopa", branches=2)
    assert from_cli == from_api
    assert (from_api.block_size, from_api.max_new_tokens, from_api.threshold) == (8, 24, 0.8)
    assert llm.default_config == decode_config_from_args(build_parser(argv[:3]).parse_args(argv[:3] + ["x"]))


def test_api_and_cli_answer_alike(ckpt: Path, capsys) -> None:
    prompt = "Q: 1 + 1? A:"
    assert (
        main(["generate", "--model", str(ckpt), "--raw", "--json", "--decoder", "lopa", "--branches", "2", prompt]) == 0
    )
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    llm = LLM(ckpt)
    api = llm.generate([prompt], llm.decode_config(decoder="lopa", branches=2), raw=True)[0]
    assert cli["settings"] == llm.decode_config(decoder="lopa", branches=2).to_dict()
    assert cli["token_ids"] == api.token_ids and cli["text"] == api.text


def test_help_says_defaults_come_from_the_checkpoint(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "checkpoint's generation_config.json, else 16" in text  # --block-size
    assert "checkpoint's generation_config.json, else 128" in text  # --max-new-tokens


def test_invalid_generation_config_warns(ckpt: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    (bad / "generation_config.json").write_text(json.dumps({"block_size": 8, "max_new_tokens": 20}))
    with pytest.warns(UserWarning, match=r"generation_config.json recommends invalid.*multiple of block_size"):
        llm = LLM(bad)
    assert llm.default_config == DecodeConfig()


def test_readme_installs_the_cpu_torch_that_ci_uses() -> None:
    readme = (ROOT / "README.md").read_text()
    ci_version = re.search(r"torch==([\d.]+)", (ROOT / ".ci" / "run").read_text())
    assert ci_version is not None
    install = readme[readme.index("## Install") : readme.index("## The two commands")]
    torch_line = next(line for line in install.splitlines() if line.startswith("pip install torch"))
    assert f"torch=={ci_version.group(1)}" in torch_line and "whl/cpu" in torch_line
    assert install.index("pip install torch") < install.index('pip install -e ".[dev]"')


def test_docs_python_example_answers_like_the_cli(capsys) -> None:
    decoding = (ROOT / "docs" / "decoding.md").read_text()  # the Python API example the README links to
    code = decoding[
        decoding.index("```python") + len("```python") : decoding.index("```\n", decoding.index("```python"))
    ]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (the README's own example)
    out, cfg = scope["out"], scope["cfg"]
    prompt = re.search(r'llm\.generate\(\["(.+?)"\]', code).group(1)
    capsys.readouterr()
    flags = ["--decoder", cfg.decoder, "--base", cfg.base, "--branches", str(cfg.branches)]
    assert main(["generate", "--raw", "--json", *flags, prompt]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["settings"] == cfg.to_dict()
    assert cli["token_ids"] == out.token_ids
