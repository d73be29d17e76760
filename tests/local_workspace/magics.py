"""Magics in an execution context: ``%pip``, ``%sh``, ``!cmd``, ``%%sh`` cells, ``get_ipython()``.

As IPython does, a cell's magic lines become calls on ``get_ipython()`` before the cell compiles
(``%pip install x`` -> ``get_ipython().run_line_magic('pip', 'install x')``, ``!ls`` ->
``get_ipython().system('ls')``, a ``%%sh`` cell -> ``get_ipython().run_cell_magic(...)``), so
nothing of the runtime's machinery sits in the user's namespace. ``%pip`` installs into the
context's own venv (notebook-scoped libraries); shell output is the command's output.
"""

import os
import sys

# The context's facts (``setup``: its venv dir, the runtime's site dir) and its namespace.
_STATE = {"init": {}, "namespace": None}


def setup(init, namespace):
    _STATE["init"] = init
    _STATE["namespace"] = namespace


def _run_process(argv, shell=False):
    import subprocess

    proc = subprocess.run(
        argv,
        shell=shell,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sys.stdout.write(proc.stdout.decode("utf-8", "replace"))
    return proc.returncode


def _magic(kind, arg):
    import shlex

    if kind == "pip":
        _pip(shlex.split(arg))
        return None
    if kind == "sh":
        _run_process(arg, shell=True)
        return None
    raise UsageError("Line magic function `%%%s` not found." % kind)


def _pip(args):
    """``%pip``: pip in the context's own environment (notebook-scoped libraries).

    The context's venv sees the runtime's packages (a .pth file), so pip installs only what is
    missing, into the context's site dir, which is first on this process's sys.path; pip never
    uninstalls the runtime's copy of a package (it is outside the context's environment)."""
    import importlib

    python = context_env()
    code = _run_process([python, "-m", "pip", "--disable-pip-version-check"] + args)
    importlib.invalidate_caches()
    return code


def context_env():
    """The context's own venv (made once, kept across a Python restart): its python."""
    import sysconfig
    import venv

    root = _STATE["init"]["context_env"]
    python = os.path.join(root, "bin", "python")
    if not os.path.exists(python):
        venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
        with open(os.path.join(context_site(), "runtime.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")  # this runtime's own site dir
        pip = os.path.join(root, "bin", "pip")
        with open(pip, "w") as f:
            f.write('#!/bin/sh\nexec "%s" -m pip "$@"\n' % python)
        os.chmod(pip, 0o755)
    return python


def context_site():
    version = "python%d.%d" % sys.version_info[:2]
    return os.path.join(_STATE["init"]["context_env"], "lib", version, "site-packages")


class IPython:
    """``get_ipython()``: the parts notebook code commonly calls."""

    def run_line_magic(self, name, line):
        return _magic(name, line)

    def run_cell_magic(self, name, line, cell):
        if name in ("sh", "bash"):
            return _magic("sh", cell)
        raise UsageError("Cell magic `%%%%%s` not found." % name)

    def system(self, cmd):
        _run_process(cmd, shell=True)

    def getoutput(self, cmd):
        import subprocess

        out = subprocess.run(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        return out.stdout.decode("utf-8", "replace").splitlines()

    @property
    def user_ns(self):
        return _STATE["namespace"]


class UsageError(Exception):
    pass


def transform_magics(code):
    """Turn %pip / %sh / ! lines into get_ipython() calls; a leading %%sh makes the whole cell
    shell."""
    stripped = code.lstrip()
    if stripped.startswith("%%"):
        first, _, body = stripped.partition("\n")
        name = first[2:].split()[0] if first[2:].split() else ""
        if name in ("sh", "bash"):
            return "get_ipython().run_cell_magic('sh', '', %r)\n" % body
        raise UsageError("Cell magic `%%%%%s` not found." % name)
    out = []
    changed = False
    for line in code.split("\n"):
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        if body.startswith("%") and not body.startswith("%%"):
            head, _, rest = body[1:].partition(" ")
            out.append("%sget_ipython().run_line_magic(%r, %r)" % (indent, head.strip(),
                                                                   rest.strip()))
            changed = True
        elif body.startswith("!"):
            out.append("%sget_ipython().system(%r)" % (indent, body[1:].strip()))
            changed = True
        else:
            out.append(line)
    return "\n".join(out) if changed else code
