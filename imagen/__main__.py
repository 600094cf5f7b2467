"""`python -m imagen` is the `imagen` command."""

import sys

from imagen.cli import main

sys.exit(main())
