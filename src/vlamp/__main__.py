"""``python -m vlamp`` is the ``vlamp`` command."""

from vlamp.cli.main import main_exit

main_exit()
