"""The code that runs on the driver, in-process: the driver section of dbx_repl.py is real Python, so
its pure parts (redaction, the pipe's markers, the result frame) are tested here directly, and its
step runner as the REPL runs it (with fds 1 and 2 left alone: the CLI tests cover their capture on
the local workspace)."""

import base64
import contextlib
import hashlib
import io
import json
import os
import stat
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dbx_repl

SECRET_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-_"   # never part of "[REDACTED]"


# -- redaction ------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(secret=st.text(SECRET_ALPHABET, min_size=4, max_size=40),
       before=st.text(max_size=30), after=st.text(max_size=30), data=st.data())
def test_a_secret_printed_in_pieces_never_reaches_the_copy(secret, before, after, data):
    redactor = dbx_repl.DriverRedactor()
    redactor.add(secret)
    whole = before + secret + after
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    pieces = [whole[a:b] for a, b in zip([0] + cuts, cuts + [len(whole)])]
    written, held = [], ""
    for piece in pieces:
        ready, held = redactor.stream(held, piece)
        written.append(ready)
    copy = "".join(written) + held
    assert secret not in copy
    assert copy == redactor.redact(whole)


def test_a_secret_is_redacted_in_the_forms_printing_gives_it():
    redactor = dbx_repl.DriverRedactor()
    secret = 'p"a\\ss-wörd'
    redactor.add(secret)
    for shown in (secret, repr(secret), json.dumps({"k": secret}), json.dumps(secret, ensure_ascii=False),
                  f"Traceback ...\nValueError: bad token {secret}!"):
        assert secret not in redactor.redact(shown) and "[REDACTED]" in redactor.redact(shown)
    redactor.add(b"\x00raw-bytes\xff")
    assert redactor.redact(repr(b"\x00raw-bytes\xff")) == "b'[REDACTED]'"
    redactor.add("bytes-as-text".encode())
    assert redactor.redact("bytes-as-text") == "[REDACTED]"


def test_a_transformed_secret_is_not_recognised_as_on_databricks():
    redactor = dbx_repl.DriverRedactor()
    redactor.add("s3cr3t-value")
    encoded = base64.b64encode(b"s3cr3t-value").decode()
    assert redactor.redact(encoded) == encoded
    assert redactor.redact("eulav-t3rc3s") == "eulav-t3rc3s"


def test_blank_values_are_not_secrets():
    redactor = dbx_repl.DriverRedactor()
    redactor.add("")
    redactor.add("   ")
    assert redactor.forms == [] and redactor.redact("a b c") == "a b c"


# -- the result frame --------------------------------------------------------------------------------

def test_the_frame_carries_the_record_and_the_inline_copy_apart_from_other_text():
    copy = "hi\n"
    record = {"key": "001_a", "bytes": 3, "sha256": hashlib.sha256(copy.encode()).hexdigest(), "inline": True}
    frame = dbx_repl.FRAME + json.dumps(record) + "\n" + copy + dbx_repl.FRAME_END
    assert dbx_repl.read_frame(frame, "001_a") == ("", record, copy)
    assert dbx_repl.read_frame("WARN x\n" + frame + "tail", "001_a") == ("WARN x\ntail", record, copy)
    assert dbx_repl.read_frame(frame, "002_b") == (frame, None, None)           # another step's frame
    assert dbx_repl.read_frame(frame[:-5], "001_a") == ("", record, None)        # the service cut the end
    assert dbx_repl.read_frame("no frame", "001_a") == ("no frame", None, None)
    big = dict(record, inline=False)
    frame = dbx_repl.FRAME + json.dumps(big) + "\n" + dbx_repl.FRAME_END
    assert dbx_repl.read_frame(frame, "001_a") == ("", big, None)               # too big to travel inline


# -- the step runner, in-process ---------------------------------------------------------------------

class FakeSecrets:
    def get(self, scope, key):
        return "s3cr3t-value"

    def getBytes(self, scope, key):  # noqa: N802 - dbutils' name
        return b"s3cr3t-bytes"


class NotebookExit(Exception):
    pass


class FakeNotebook:
    def exit(self, value):
        raise NotebookExit(str(value))


class FakeDbutils:
    secrets = FakeSecrets()
    notebook = FakeNotebook()


@pytest.fixture
def repl(tmp_path):
    """The helpers installed into a fresh namespace (fds 1 and 2 untouched), copies under tmp_path."""
    shown = []
    namespace = {"__name__": "__main__", "display": lambda value, *args, **kwargs: shown.append(value),
                 "dbutils": FakeDbutils()}
    hooks_before = list(sys.meta_path)
    config = {"session_id": "0123abcd", "out_dir": str(tmp_path), "copies_bytes": 6000, "capture_fds": []}
    helpers = dbx_repl.driver_install(config, namespace)
    helpers.shown, helpers.ns = shown, namespace
    try:
        yield helpers
    finally:
        helpers.output.close()
        for name in ("_dbx_repl_output", "_dbx_repl_installed"):
            if hasattr(sys, name):
                delattr(sys, name)
        sys.meta_path[:] = hooks_before
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and hasattr(plt.show, "_dbx_repl_original"):
            plt.show = plt.show._dbx_repl_original


def run(helpers, key, source):
    """Run a step as the CLI's wrapped command does: (the result text, the exception raised)."""
    captured = io.StringIO()
    error = None
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            helpers.run(key, base64.b64encode(source.encode()).decode())
        except BaseException as raised:  # noqa: B036 - SystemExit is one of the endings under test
            error = raised
    return captured.getvalue(), error


def record_of(helpers, key):
    with open(helpers.out_path(key, ".end")) as f:
        return json.load(f)


def copy_of(helpers, key, suffix=".out"):
    with open(helpers.out_path(key, suffix)) as f:
        return f.read()


def test_the_bootstrap_installs_the_driver_section_as_its_own_module(tmp_path):
    command = dbx_repl.bootstrap_command({"session_id": "ab12", "host": "https://x\"y'z", "out_dir": str(tmp_path),
                                          "capture_fds": []})
    namespace = {"__name__": "__main__"}
    hooks_before = list(sys.meta_path)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(command, "<bootstrap>", "exec"), namespace)
        assert printed.getvalue() == "dbx-repl bootstrap ready fresh\n"
        helpers = namespace["_dbx_repl"]
        assert sorted(k for k in namespace if not k.startswith("__")) == [
            "_dbx_repl", "sub_llm", "sub_llm_batch", "sub_llm_budget", "sub_llm_usage"]
        assert type(helpers).__module__ == "dbx_repl_driver" and helpers.out_dir.endswith("dbx_repl_ab12")
        assert namespace["sub_llm_usage"]()["calls"] == 0
        helpers.output.close()
    finally:
        sys.modules.pop("dbx_repl_driver", None)
        for name in ("_dbx_repl_output", "_dbx_repl_installed"):
            if hasattr(sys, name):
                delattr(sys, name)
        sys.meta_path[:] = hooks_before


def test_a_step_ends_with_its_record_and_its_copy_inline(repl):
    text, error = run(repl, "001_a", "print('hello')\n6 * 7")
    assert error is None
    outside, record, inline = dbx_repl.read_frame(text, "001_a")
    assert outside == "" and inline == "hello\n42\n" == copy_of(repl, "001_a")
    assert record["sha256"] == hashlib.sha256(b"hello\n42\n").hexdigest() and record["bytes"] == 9
    assert record["ending"] == {"kind": "finished"}
    assert {k: v for k, v in record_of(repl, "001_a").items()} == {k: v for k, v in record.items() if k != "inline"}


def test_a_large_copy_stays_on_the_driver_and_the_frame_says_so(repl):
    text, _ = run(repl, "001_big", "print('x' * 40000)")
    _, record, inline = dbx_repl.read_frame(text, "001_big")
    assert inline is None and record["bytes"] == 40001 and "inline" not in record


def test_a_secret_read_in_a_step_is_redacted_everywhere_the_driver_writes(repl):
    text, error = run(repl, "001_s", "s = dbutils.secrets.get('scope', 'key')\nprint('token', s, repr(s))\n"
                                     "raise ValueError('bad ' + s)")
    assert isinstance(error, ValueError)
    for suffix in (".out", ".err", ".end"):
        assert "s3cr3t-value" not in copy_of(repl, "001_s", suffix)
    assert copy_of(repl, "001_s") == "token [REDACTED] '[REDACTED]'\n"
    assert record_of(repl, "001_s")["ending"] == {"kind": "raised", "type": "ValueError", "message": "bad [REDACTED]"}
    assert copy_of(repl, "001_s", ".err").endswith("ValueError: bad [REDACTED]\n")
    run(repl, "002_b", "b = dbutils.secrets.getBytes('scope', 'key')\nprint(b, b.decode())")
    assert copy_of(repl, "002_b") == "b'[REDACTED]' [REDACTED]\n"


def test_notebook_exit_is_recorded_as_the_steps_exit_value(repl):
    text, error = run(repl, "001_x", "print('result: 7')\ndbutils.notebook.exit('7')")
    assert isinstance(error, NotebookExit)
    assert record_of(repl, "001_x")["ending"] == {"kind": "exit", "value": "7"}
    assert copy_of(repl, "001_x") == "result: 7\n"


def test_output_after_a_step_goes_to_its_late_file_and_the_next_record_names_it(repl):
    run(repl, "001_t", "import logging, sys\nlog = logging.getLogger('t')\nlog.addHandler(logging.StreamHandler(sys.stdout))\n"
                       "print('started')")
    repl.ns["log"].warning("between steps")   # a handler bound in step 1, writing after it ended
    text, _ = run(repl, "002_n", "print('next')")
    late = dbx_repl.read_frame(text, "002_n")[1]["late"]
    assert late["after"] == "001_t" and late["bytes"] == len("between steps\n")
    assert copy_of(repl, "001_t", ".late") == "between steps\n"
    assert copy_of(repl, "001_t") == "started\n" and copy_of(repl, "002_n") == "next\n"
    text, _ = run(repl, "003_q", "print('quiet gap')")
    assert dbx_repl.read_frame(text, "003_q")[1]["late"] is None
    assert not os.path.exists(repl.out_path("002_n", ".late"))   # an empty gap leaves no file


def test_exceptions_are_recorded_as_python_prints_them(repl):
    source = ("import sys, types\nmod = sys.modules['mymod'] = types.ModuleType('mymod')\n"
              "exec('class MyError(Exception):\\n    pass', mod.__dict__)\nraise mod.MyError('a\\nb')")
    _, error = run(repl, "001_e", source)
    assert type(error).__name__ == "MyError"
    assert record_of(repl, "001_e")["ending"] == {"kind": "raised", "type": "mymod.MyError", "message": "a\nb"}
    traceback_text = copy_of(repl, "001_e", ".err")
    assert traceback_text.endswith("mymod.MyError: a\nb\n") and "_dbx_repl" not in traceback_text
    run(repl, "002_x", "raise SystemExit(0)")
    assert record_of(repl, "002_x")["ending"] == {"kind": "raised", "type": "SystemExit", "message": "0",
                                                  "exit_code": 0}


def test_an_indented_cell_is_dedented_and_a_bad_one_still_fails(repl):
    text, error = run(repl, "001_i", "    x = 2\n    print(x * 3)")
    assert error is None and dbx_repl.read_frame(text, "001_i")[2] == "6\n"
    _, error = run(repl, "002_i", "  x = 1\n y = 2")
    assert isinstance(error, IndentationError)


def test_figures_are_saved_once_each_and_closed(repl):
    pytest.importorskip("matplotlib")
    source = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
              "fig = plt.figure(figsize=(2, 1))\ndisplay(fig)\ndisplay(fig)\nplt.figure(figsize=(1, 1))\n"
              "display([1, 2])")
    text, error = run(repl, "001_p", source)
    assert error is None
    assert dbx_repl.read_frame(text, "001_p")[1]["images"] == ["001_p.1.png", "001_p.2.png"]
    assert repl.shown == [[1, 2]]  # only the non-plot reached the REPL's display
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []
    for name in ("001_p.1.png", "001_p.2.png"):
        assert stat.S_IMODE(os.stat(os.path.join(repl.out_dir, name)).st_mode) == 0o600


def test_old_copies_are_pruned_past_the_sessions_bound(repl):
    for step in range(1, 9):
        run(repl, "%03d_big" % step, "print('x' * 999)")
    names = sorted(os.listdir(repl.out_dir))
    total = sum(os.path.getsize(os.path.join(repl.out_dir, n)) for n in names)
    assert total <= 6000 + 1400  # the bound, plus the step that ran after the last prune
    assert "008_big.out" in names and "001_big.out" not in names
    assert all(stat.S_IMODE(os.stat(os.path.join(repl.out_dir, n)).st_mode) == 0o600 for n in names)


def test_remove_copies_deletes_the_sessions_directory(repl):
    run(repl, "001_r", "print('bye')")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        repl.remove_copies()
    assert json.loads(printed.getvalue())["removed"] >= 2
    assert not os.path.exists(repl.out_dir)
    with pytest.raises(ValueError):
        repl.remove_copies("../etc")


def test_previews_collapse_progress_frames_and_show_other_controls():
    assert dbx_repl.printable("a\r\nstep 1\rstep 2\rstep 3\ndone\x07") == "a\nstep 3\ndone\ufffd"


# -- remote paths --------------------------------------------------------------------------------------

@pytest.mark.parametrize("typed, meant", [
    ("dbfs:/x/y.csv", "/dbfs/x/y.csv"), ("dbfs:///x", "/dbfs/x"), ("dbfs:/", "/dbfs"),
    ("/Volumes/main/raw/files/a.csv", "/Volumes/main/raw/files/a.csv"), ("/Workspace/Users/me/x.py", "/Workspace/Users/me/x.py"),
    ("/dbfs/tmp/x", "/dbfs/tmp/x"), ("data/x.csv", "data/x.csv"), ("./x", "x"), ("a//b/./c", "a/b/c"),
    ("/Volumes/a/b/../c", "/Volumes/a/c"), ("/local_disk0/tmp/x", "/local_disk0/tmp/x")])
def test_remote_paths_mean_what_users_type(typed, meant):
    assert dbx_repl.driver_path(typed) == meant


@pytest.mark.parametrize("typed", ["s3://bucket/key", "abfss://c@a.dfs.core.windows.net/x", "file:/etc/passwd",
                                   "C:/x", "dbfs:x", "a\\b", "..", "../x", "a/../../x", "/Volumes/../etc/passwd",
                                   "dbfs:/../x", "", "  "])
def test_other_schemes_backslashes_and_climbing_out_are_refused(typed):
    with pytest.raises(dbx_repl.ReplError) as refused:
        dbx_repl.driver_path(typed)
    assert refused.value.status == "InvalidPath" and refused.value.exit_code == dbx_repl.EXIT_USAGE


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("ab./:\\"), max_size=16))
def test_an_accepted_path_never_names_a_scheme_folder_or_leaves_its_root(typed):
    try:
        meant = dbx_repl.driver_path(typed)
    except dbx_repl.ReplError:
        return
    assert "\\" not in meant and not meant.startswith("dbfs:") and ".." not in meant.split("/")
    if typed.startswith("/"):
        assert meant.split("/")[1] == typed.lstrip("/").split("/")[0]
