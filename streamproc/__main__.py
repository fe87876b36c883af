"""``python -m streamproc serve | status | stop`` (see :mod:`streamproc.service.cli`)."""

import sys

from .service.cli import main

sys.exit(main())
