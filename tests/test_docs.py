"""The docs the code cites exist and say what the code does; the README's install and the docs' Python example hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lopa.checkpoint.bundled import BUNDLED_MODEL_NAME
from lopa.checkpoint.tokenizer import IM_END_TOKEN
from lopa.commands.main import main

ROOT = Path(__file__).resolve().parent.parent
ALGORITHM = ROOT / "docs" / "algorithm.md"


def _cited_sections() -> set[tuple[str, str]]:
    """(file, section) for every 'docs/algorithm.md §N' in the code and docs."""
    found = set()
    for path in [*ROOT.joinpath("lopa").rglob("*.py"), *ROOT.joinpath("docs").glob("*.md"), ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"algorithm\.md`?\s*§\s*(\d+)", text):
            found.add((str(path.relative_to(ROOT)), m.group(1)))
    return found


def test_algorithm_md_has_every_cited_section() -> None:
    headings = set(re.findall(r"^## (\d+)\.", ALGORITHM.read_text(encoding="utf-8"), flags=re.M))
    cited = _cited_sections()
    assert len(cited) >= 5  # the code does cite it
    missing = sorted((f, n) for f, n in cited if n not in headings)
    assert not missing, f"cited sections missing from docs/algorithm.md: {missing}"


def test_algorithm_md_states_the_deliberate_departures() -> None:
    text = ALGORITHM.read_text(encoding="utf-8")
    departures = text[text.index("departs from the authors' code") :]
    assert "mask token is never a candidate" in departures and IM_END_TOKEN in departures
    assert "MaskTokenInPromptError" in departures
    assert "infill" in departures


def test_served_model_name_in_the_docs_is_the_bundled_one() -> None:
    for doc in ("docs/serve.md", "README.md", "docs/decoding.md", "docs/batching.md"):
        names = set(re.findall(r'"?model"?\s*[=:]\s*"([^"]+)"', (ROOT / doc).read_text(encoding="utf-8")))
        assert names or doc != "docs/serve.md", doc  # serve.md's examples name the model
        assert names <= {BUNDLED_MODEL_NAME}, (
            f"{doc} uses model names {names}; `lopa serve` serves {BUNDLED_MODEL_NAME!r}"
        )


def test_readme_fits_a_screen_and_links_resolve() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith("http")]
    assert local, "the README links its docs pages"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    for page in ("docs/bench.md", "docs/decoding.md", "docs/serve.md", "docs/checkpoints.md", "docs/gpu.md"):
        assert page in local, page
    assert "v1" not in text  # the first bundled model's numbers live in docs/batching.md, labelled as history


def test_readme_bench_table_is_the_default_run() -> None:
    from lopa.tiny.bench_sweep import QUICK

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [r for r in re.findall(r"^\| \**([a-z0-9+-]+)\** \|", text, flags=re.M) if r not in ("decoder", "family")]
    assert rows[: len(QUICK)] == QUICK
    assert "lopa bench --plot docs/bench-default.png" in text


def test_docs_state_the_bundled_models_recommendation() -> None:
    gen = json.loads((ROOT / "lopa/tiny/checkpoint/generation_config.json").read_text(encoding="utf-8"))
    text = (ROOT / "docs" / "decoding.md").read_text(encoding="utf-8")
    m = re.search(r"bundled model \(v8\) recommends `(\w+)`, τ = ([0-9.]+), blocks of (\d+), (\d+) new tokens", text)
    assert m, "docs/decoding.md states the bundled model's recommended settings"
    assert (m.group(1), float(m.group(2)), int(m.group(3)), int(m.group(4))) == (
        gen["decoder"],
        gen["threshold"],
        gen["block_size"],
        gen["max_new_tokens"],
    )


def test_batching_page_labels_v1_as_history() -> None:
    text = (ROOT / "docs" / "batching.md").read_text(encoding="utf-8")
    history = text.index("## History: bundled model v1")
    assert "v1" not in text[:history]


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
