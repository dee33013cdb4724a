"""``python -m nti_core edit|demo``."""

from .app import main

raise SystemExit(main())
