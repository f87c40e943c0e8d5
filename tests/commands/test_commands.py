"""The command layout: ``lopa --help`` imports no torch, and only ``lopa/commands/`` parses flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lopa

PACKAGE = Path(lopa.__file__).parent


def test_top_level_help_imports_no_torch() -> None:
    code = (
        "import contextlib, sys\n"
        "from lopa.commands.main import main\n"
        "with contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: lopa" in out and out.strip().endswith("NO-TORCH")


def test_only_the_commands_package_imports_argparse() -> None:
    users = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "argparse" in p.read_text(encoding="utf-8")
    )
    assert users and all(u.startswith("commands/") for u in users), users
