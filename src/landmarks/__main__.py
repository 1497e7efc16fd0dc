"""``python -m landmarks`` is the ``landmarks`` command."""

from landmarks.cli import main

raise SystemExit(main())
