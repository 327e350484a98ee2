"""``python -m th_edit`` is ``th-edit``."""

from .app.cli import main

raise SystemExit(main())
