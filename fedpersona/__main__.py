"""`python -m fedpersona ...` is the `fedpersona` command."""

import sys

from fedpersona.cli import main

sys.exit(main())
