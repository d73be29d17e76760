"""`python3 <the skill's folder> SUBCOMMAND ...` runs dbx_repl.py, the skill's one CLI.

Imported as a module, dbx_repl.py's compiled code is cached in __pycache__ as Python caches any
import, so a call skips compiling its 330 KB; run as `python3 dbx_repl.py` it is compiled on every
call (about 0.1 s). Nothing else lives here.
"""
import sys

import dbx_repl

sys.exit(dbx_repl.main())
