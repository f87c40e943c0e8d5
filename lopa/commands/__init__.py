"""The ``lopa`` command's doors: ``main.py`` dispatches, ``flags.py`` holds the shared flags, and each other
module is one subcommand (``add_arguments`` + ``run``). The only package that imports ``argparse``."""
