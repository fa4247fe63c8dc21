"""Run the end-to-end demo (same as `make demo` / `python -m fedpersona.demo`); see
fedpersona/demo.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedpersona.demo import main

if __name__ == "__main__":
    sys.exit(main())
