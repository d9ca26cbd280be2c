"""``python -m metanet`` (and ``torchrun -m metanet``) runs the command line."""

import sys

from .cli import main

sys.exit(main())
