"""`python -m conformance`: the `dsv3-conformance` command."""

import sys

from conformance.cli import main

sys.exit(main())
