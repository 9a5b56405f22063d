"""`python -m deltaserve ...`: the same command line as the `deltaserve` script."""

import sys

from deltaserve.cli import main

sys.exit(main())
