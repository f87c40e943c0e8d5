"""Hugging Face hub ids as ``--model``: resolved through the hub's standard cache, offline only.

The test writes a hub cache by hand in the hub's own layout (``models--ORG--NAME/refs/<ref>`` holding a commit
hash, ``snapshots/<hash>/`` holding the files) and runs lopa in subprocesses with ``HF_HUB_OFFLINE=1`` and
``HF_HUB_CACHE`` pointing at it (huggingface_hub reads both at import), so the network is never used. Two
snapshots with different weights tell ``main`` and ``--revision v2`` apart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lopa.checkpoint.hub import is_hub_id, model_name_for, resolve_model
from lopa.errors import CheckpointNotFoundError, HubNotInstalledError
from lopa.testing import make_tiny_checkpoint

REPO = "acme/tiny-dream"
MAIN, V2 = "a" * 40, "b" * 40  # commit hashes of the two snapshots
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    cache = tmp_path_factory.mktemp("hub") / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    shutil.copytree(tiny_ckpt, repo / "snapshots" / MAIN)
    make_tiny_checkpoint(repo / "snapshots" / V2, seed=7)  # other weights: another output
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    return cache


def _run(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(cache.parent / "hf-home"),
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


PROBE = """
import json, sys
from lopa import LLM
from lopa.errors import HubModelNotFoundError
out = {}
for key, model, rev in [("main", "acme/tiny-dream", None), ("v2", "acme/tiny-dream", "v2"),
                        ("hash", "acme/tiny-dream", "%s")]:
    llm = LLM(model, revision=rev)
    text = llm.generate("hi", llm.decode_config(max_new_tokens=8, block_size=8))[0].text
    out[key] = [str(llm.checkpoint.path), llm.model_name, text]
try:
    LLM("acme/missing-model")
except HubModelNotFoundError as e:
    out["missing"] = str(e)
print(json.dumps(out))
"""


def test_llm_loads_hub_ids_offline_from_the_cache(hub_cache: Path, tmp_path: Path) -> None:
    r = _run(["-c", PROBE % V2], hub_cache, tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    snaps = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots"
    assert out["main"][:2] == [str(snaps / MAIN), REPO]  # served under the hub id, not the commit hash
    assert out["v2"][:2] == [str(snaps / V2), REPO]
    assert out["hash"][0] == str(snaps / V2)  # a commit hash is a revision too
    assert out["v2"][2] == out["hash"][2]
    assert out["main"][2] != out["v2"][2]  # different weights, different output: the revision was honoured
    missing = out["missing"]
    assert "acme/missing-model" in missing and "hf download acme/missing-model" in missing
    assert "HF_HUB_OFFLINE" in missing and str(hub_cache) in missing


def test_cli_generate_takes_a_hub_id_and_revision(hub_cache: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    from lopa import LLM

    args = ["-m", "lopa", "generate", "--json", "--raw", "--max-new-tokens", "8", "--block-size", "8", "hi"]
    main = _run([*args, "--model", REPO], hub_cache, tmp_path)
    v2 = _run([*args, "--model", REPO, "--revision", "v2"], hub_cache, tmp_path)
    assert main.returncode == 0 and v2.returncode == 0, main.stderr + v2.stderr
    text = {k: json.loads(r.stdout.strip().splitlines()[-1])["text"] for k, r in (("main", main), ("v2", v2))}
    # independently: the same checkpoints loaded from their directories
    cfg = dict(max_new_tokens=8, block_size=8)
    llm = LLM(tiny_ckpt)
    assert text["main"] == llm.generate(["hi"], llm.decode_config(**cfg), raw=True)[0].text
    snap_v2 = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / V2
    llm2 = LLM(snap_v2)
    assert text["v2"] == llm2.generate(["hi"], llm2.decode_config(**cfg), raw=True)[0].text

    missing = _run([*args, "--model", "acme/missing-model"], hub_cache, tmp_path)
    assert missing.returncode != 0
    assert "HubModelNotFoundError" in missing.stderr or "hf download acme/missing-model" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_local_directory_wins_over_a_hub_id(hub_cache: Path, tmp_path: Path) -> None:
    local = make_tiny_checkpoint(tmp_path / "acme" / "tiny-dream", seed=3)
    r = _run(["-c", "from lopa import LLM; print(LLM('acme/tiny-dream').checkpoint.path)"], hub_cache, tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / r.stdout.strip()).resolve() == local.resolve()  # relative to the subprocess's cwd
    assert resolve_model(str(local)) == local  # in process too: no hub involved
    assert model_name_for(str(local), local) == "tiny-dream"


def test_names_and_errors_without_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_id("Dream-org/Dream-v0-Instruct-7B") and is_hub_id("a/b.c-d_e")
    for name in ("/abs/path", "./rel/dir", "no-slash", "a/b/c", "~/x", "../x", "a/..b"):
        assert not is_hub_id(name), name
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "nothing" / "here" / "deep")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the hub extra were not installed
    with pytest.raises(HubNotInstalledError, match=r"pip install 'lopa\[hub\]'"):
        resolve_model("acme/not-local")
