"""``python -m dmamig``: the same as the ``dmamig`` command."""

import sys

from .cli import main

sys.exit(main())
