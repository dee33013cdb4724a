"""``python -m nti_core edit|demo``."""

from .cli import main

raise SystemExit(main())
