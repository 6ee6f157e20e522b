"""``python -m fnf ...`` is the ``fnf`` command."""
from .cli import main

raise SystemExit(main())
