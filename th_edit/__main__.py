"""``python -m th_edit`` is ``th-edit``."""

from .cli import main

raise SystemExit(main())
