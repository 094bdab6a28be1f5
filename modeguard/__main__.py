"""``python -m modeguard ...``: the same CLI as the ``modeguard`` command."""

from .cli import main

raise SystemExit(main())
