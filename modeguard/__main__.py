"""``python -m modeguard ...``: the same CLI as the ``modeguard`` command."""

from ._cli import main

raise SystemExit(main())
