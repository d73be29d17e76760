"""``python tests/local_workspace serve``: run the local workspace until Ctrl+C."""

import os
import sys

if __package__ in (None, ""):  # run as a folder: make the package importable by name
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from local_workspace.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
