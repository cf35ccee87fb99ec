"""`python -m dsv3_conformance`: the `dsv3-conformance` command."""

import sys

from dsv3_conformance.cli import main

sys.exit(main())
