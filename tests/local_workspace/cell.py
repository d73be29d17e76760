"""Running one Python command of an execution context, as a notebook cell runs.

The cell is dedented, its magics become ``get_ipython()`` calls (``magics.py``), and it runs in the
context's namespace with stdout and stderr captured (``capture.py``); a last expression's value
comes back as ``Out[n]: ...``, the last ``display()`` as a table or image (``display.py``). An
exception becomes the error result a cluster gives: its name and message as the ``summary``, an
ANSI-coloured traceback of the user's own frames as the ``cause`` (the runtime's frames hidden).
"""

import ast
import os

from . import display
from .capture import MAX_RESULT_CHARS, captured
from .dbutils import RestartPython, _NotebookExit
from .magics import UsageError, transform_magics

# The runtime's own frames (this package) are hidden from tracebacks, as a cluster hides its own.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

RED = "\x1b[0;31m"
GREEN = "\x1b[0;32m"
CYAN = "\x1b[0;36m"
RESET = "\x1b[0m"

# Commands that ran in this process (``Out[n]``), and whether the last one asked for a restart.
_STATE = {"counter": 0, "restart": False}


def run(code, namespace, cancelling):
    """The result of running ``code`` in ``namespace``. ``cancelling()``: was the running
    command's cancel asked for? (then an interrupt propagates: the command is cancelled)."""
    import linecache

    _STATE["counter"] += 1
    n = _STATE["counter"]
    filename = "<command-%d>" % (4_000_000_000 + os.getpid() * 1000 + n)
    value = None
    try:
        with captured() as parts:
            try:
                source = transform_magics(_dedent_cell(code))
                linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
                tree = ast.parse(source, filename, "exec")
                last = None
                if tree.body and isinstance(tree.body[-1], ast.Expr):
                    last = ast.Expression(tree.body.pop().value)
                exec(compile(tree, filename, "exec"), namespace)
                if last is not None:
                    value = eval(compile(last, filename, "eval"), namespace)
                display.show_figures_at_end()
            finally:
                display.close_all_figures()
    except _NotebookExit as e:
        return {"resultType": "text", "data": str(e.value)}
    except RestartPython:
        _STATE["restart"] = True
        return {"resultType": "text", "data": ""}
    except KeyboardInterrupt:
        if cancelling():
            raise
        return error_result(KeyboardInterrupt(), filename)
    except UsageError as e:
        return {
            "resultType": "error",
            "summary": summary("UsageError", str(e)),
            "cause": RED + "UsageError" + RESET + ": " + str(e),
        }
    except BaseException as e:  # noqa: B902 - user code may raise SystemExit etc.
        return error_result(e, filename)
    if display.shown() is not None:
        return display.shown()
    text = "".join(parts)
    if value is not None:
        namespace["_"] = value
        try:
            shown = repr(value)
        except Exception as e:  # a broken __repr__
            return error_result(e, filename)
        if text and not text.endswith("\n"):
            text += "\n"
        text += "Out[%d]: %s" % (n, shown)
    return _text_result(text)


def restarts_python(code, limits):
    """Does this command end with a Python restart? ``dbutils.library.restartPython()`` always;
    ``%pip`` only when the cluster restarts Python after it (``pip_restarts``)."""
    if _STATE["restart"]:
        _STATE["restart"] = False
        return True
    return bool(limits.get("pip_restarts")) and any(
        line.lstrip().startswith("%pip") for line in code.split("\n"))


def _text_result(text):
    """Text as the service returns it: without its final newline (``print(1)`` gives ``"1"``:
    the Go SDK's, databricks-vscode's and terraform's live tests, S18/S13/S19)."""
    if text.endswith("\n"):
        text = text[:-1]
    return {"resultType": "text", "data": text[: MAX_RESULT_CHARS + 1]}


def _dedent_cell(code):
    """A uniformly indented cell runs: IPython strips the common indent (the SDK's dbutils proxy
    sends code that way: S8, S15)."""
    import textwrap

    return textwrap.dedent(code)


def summary(exc_type, message):
    import html

    text = "<span class='ansi-red-fg'>%s</span>" % html.escape(exc_type)
    if message:
        text += ": " + html.escape(message)
    return text


def exc_name(exc):
    return type(exc).__name__


def error_result(exc, filename):
    import linecache
    import traceback

    name = exc_name(exc)
    message = str(exc)
    lines = [RED + "-" * 75 + RESET]
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        lines.append("  File " + GREEN + "%s:%s" % (exc.filename, exc.lineno) + RESET)
        if exc.text:
            lines.append("    " + exc.text.rstrip("\n"))
            if exc.offset:
                lines.append("    " + " " * (exc.offset - 1) + "^")
        lines.append(RED + name + RESET + ": " + (exc.msg or ""))
        return {
            "resultType": "error",
            "summary": summary(name, exc.msg or ""),
            "cause": "\n".join(lines),
        }
    lines.append(
        RED + name + RESET + " " * max(1, 42 - len(name)) + "Traceback (most recent call last)"
    )
    frames = traceback.extract_tb(exc.__traceback__)
    # Drop the worker's own frames that precede the user's code.
    while frames and frames[0].filename != filename:
        frames.pop(0)
    # ... and the runtime's own frames (the lazy `spark`, dbutils), as a cluster hides its own.
    frames = [f for f in frames
              if os.path.dirname(os.path.abspath(f.filename)) != _PACKAGE_DIR]
    for frame in frames:
        lines.append("File " + GREEN + "%s:%s" % (frame.filename, frame.lineno) + RESET
                     + (", in " + CYAN + frame.name + RESET if frame.name != "<module>" else ""))
        source = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
        if source:
            lines.append(GREEN + "----> %d" % frame.lineno + RESET + " " + source)
        lines.append("")
    lines.append(RED + name + RESET + ": " + message)
    return {
        "resultType": "error",
        "summary": summary(name, message),
        "cause": "\n".join(lines),
    }
