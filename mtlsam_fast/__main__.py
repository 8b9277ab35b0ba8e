"""``python -m mtlsam_fast`` == ``mtlsam-fast``."""

import sys

from .cli import main

sys.exit(main())
