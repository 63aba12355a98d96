"""The ``vlamp`` command line: thin wrappers that parse, call the library and print."""

from vlamp.cli.main import main, main_exit

__all__ = ["main", "main_exit"]
