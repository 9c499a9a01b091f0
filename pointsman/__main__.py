"""``python -m pointsman``: the same as the ``pointsman`` command."""

from __future__ import annotations

import sys

from pointsman.cli import main

sys.exit(main())
