"""Text that is not Unicode (a lone UTF-16 surrogate, bytes that are not UTF-8) gets a named error everywhere:
a 400 ``invalid_text`` from every server route, InvalidTextError from the Python API, a one-line CLI message."""

from __future__ import annotations

import io
import subprocess
import sys

import httpx
import pytest

from lopa import LLM, DecodeConfig
from lopa.commands.generate import read_prompt_lines
from lopa.errors import InvalidTextError
from lopa.server import create_app
from lopa.server.background import serve_in_background

CFG = DecodeConfig(block_size=8, max_new_tokens=8)
# raw JSON, since a JSON encoder would refuse to write a lone surrogate
BODIES = {
    "/v1/completions": '{"prompt": "abc\\ud800", "max_tokens": 8}',
    "/v1/chat/completions": '{"messages": [{"role": "user", "content": "x\\udfffy"}], "max_tokens": 8}',
    "/v1/trace": '{"prompt": "abc\\ud800", "max_tokens": 8}',
}
ELSEWHERE = [  # a lone surrogate in a field that is not the prompt, or in a key, is refused the same way
    '{"prompt": "hi", "max_tokens": 8, "model": "\\ud800"}',
    '{"prompt": "hi", "max_tokens": 8, "stop": ["\\udc00"]}',
    '{"prompt": "hi", "max_tokens": 8, "lopa": {"\\ud800": 1}}',
    '{"prompt": ["ok", "\\ud800"], "max_tokens": 8}',
    '{"prompt": "hi", "max_tokens": 8, "user": "\\ud800", "stream": true}',
]


@pytest.fixture(scope="module")
def llm(tiny_ckpt) -> LLM:
    return LLM(tiny_ckpt)


@pytest.fixture(scope="module")
def base_url(llm):
    with serve_in_background(create_app(llm, default_config=CFG)) as url:
        yield url


def _post(url: str, body: str) -> httpx.Response:
    return httpx.post(url, content=body.encode(), headers={"Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("route", list(BODIES))
def test_a_lone_surrogate_is_a_400_naming_it_on_every_route(base_url, route: str) -> None:
    r = _post(base_url + route, BODIES[route])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_text" and "lone UTF-16 surrogate" in error["message"]


@pytest.mark.parametrize("body", ELSEWHERE)
def test_a_lone_surrogate_in_any_field_or_key_is_a_400(base_url, body: str) -> None:
    r = _post(base_url + "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_text"


def test_a_valid_surrogate_pair_is_served(base_url) -> None:
    r = _post(base_url + "/v1/completions", '{"prompt": "smile \\ud83d\\ude00", "max_tokens": 8}')
    assert r.status_code == 200, r.text


def test_the_python_api_raises_invalid_text_error(llm) -> None:
    with pytest.raises(InvalidTextError, match="character 3 is a lone UTF-16 surrogate U\\+D800"):
        llm.generate("abc\ud800", CFG)
    with pytest.raises(InvalidTextError, match="lone UTF-16 surrogate"):
        llm.generate("abc\ud800", CFG, raw=True)
    with pytest.raises(InvalidTextError, match="message 2"):
        llm.encode_prompt([{"role": "system", "content": "s"}, {"role": "user", "content": "\udfff"}])
    with pytest.raises(InvalidTextError, match="byte 0xE9"):  # what surrogateescape makes of a Latin-1 byte
        llm.tokenizer.encode("caf\udce9")


def test_stdin_that_is_not_utf8_names_the_line_and_byte() -> None:
    assert read_prompt_lines(io.BytesIO("Q: café A:\r\n\n  \nnext\n".encode())) == ["Q: café A:", "next"]
    with pytest.raises(InvalidTextError, match="line 2 of the standard input is not UTF-8: byte 0xE9 at byte 6"):
        read_prompt_lines(io.BytesIO(b"fine\nQ: caf\xe9 A:\n"))


@pytest.mark.parametrize("how", ["stdin", "argv"])
def test_the_cli_prints_one_line_not_a_traceback(tiny_ckpt, how: str) -> None:
    cmd = [sys.executable, "-m", "lopa", "generate", "--raw", "--model", str(tiny_ckpt), "--block-size", "8"]
    cmd += ["--max-new-tokens", "8"]
    if how == "argv":
        cmd.append(b"Q: caf\xe9 A:".decode("utf-8", "surrogateescape"))
    r = subprocess.run(cmd, input=b"Q: caf\xe9 A:\n", capture_output=True, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err and "not UTF-8: byte 0xE9" in err
