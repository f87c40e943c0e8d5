"""``python -m lopa`` is the ``lopa`` command."""

import sys

from lopa.commands.main import main

sys.exit(main())
