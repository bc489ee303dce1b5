"""`python -m rmc` runs the `rmc` command."""

import sys

from rmc.cli import main

sys.exit(main())
