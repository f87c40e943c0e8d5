"""The docs the code cites exist and say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from lopa.llm import BUNDLED_MODEL_NAME
from lopa.tokenizer import IM_END_TOKEN

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
    for doc in ("docs/serve.md", "README.md"):
        names = set(re.findall(r'"?model"?\s*[=:]\s*"([^"]+)"', (ROOT / doc).read_text(encoding="utf-8")))
        assert names, doc
        assert names <= {BUNDLED_MODEL_NAME}, (
            f"{doc} uses model names {names}; `lopa serve` serves {BUNDLED_MODEL_NAME!r}"
        )
