"""`python3 <the skill's folder> SUBCOMMAND ...` runs dbx_repl.py, the skill's one CLI.

Imported as a module, dbx_repl.py's compiled code is cached in __pycache__ as Python caches any
import, so a call skips compiling the whole file; run as `python3 dbx_repl.py` it is compiled on
every call (about 0.1 s here). The folder comes first on sys.path, so this folder's dbx_repl.py runs however
this file was started (`python3 -m`, or by its own path). Nothing else lives here.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dbx_repl  # noqa: E402

sys.exit(dbx_repl.main())
