"""Output capture in an execution context: what a command prints, in the order written.

``sys.stdout`` and ``sys.stderr`` both write into one ``Capture`` while a command runs (the
protocol never uses fd 1/2). Past ``MAX_RESULT_CHARS`` the rest is dropped; the result's text is
cut there too.
"""

import sys

MAX_RESULT_CHARS = 20 * 1024 * 1024


class Capture:
    """A text stream that collects stdout and stderr in the order written."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, parts):
        self._parts = parts
        self._size = 0

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        if self._size <= MAX_RESULT_CHARS:
            self._parts.append(s)
            self._size += len(s)
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def fileno(self):
        import io

        raise io.UnsupportedOperation("fileno")



class captured:
    """``with captured() as parts:`` stdout and stderr go to ``parts`` (a list of str) inside."""

    def __enter__(self):
        self.parts = []
        self._saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = Capture(self.parts)
        return self.parts

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self._saved
        return False
