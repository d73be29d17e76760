"""The bootstrap in-process: `_dbx_repl_install` is real Python in dbx_repl.py, so its pieces can be
exercised here directly, the way the REPL on the driver runs them (and through the CLI elsewhere)."""

import base64
import contextlib
import io
import json
import os
import stat
import sys

import pytest

import dbx_repl


@pytest.fixture
def repl(tmp_path):
    """The helpers installed into a fresh namespace, with driver copies under tmp_path."""
    shown = []
    namespace = {"__name__": "__main__", "display": lambda value, *args, **kwargs: shown.append(value)}
    hooks_before = list(sys.meta_path)
    config = {"session_id": "0123abcd", "out_dir": str(tmp_path), "copies_bytes": 4000}
    dbx_repl._dbx_repl_install(config, namespace)
    helpers = namespace["_dbx_repl"]
    helpers.shown = shown
    try:
        yield helpers
    finally:
        sys.meta_path[:] = hooks_before
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and hasattr(plt.show, "_dbx_repl_original"):
            plt.show = plt.show._dbx_repl_original


def run(helpers, key, source):
    """Run a step as the CLI's wrapped command does; returns (the REPL's text, the exception)."""
    captured = io.StringIO()
    error = None
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            helpers.run(key, base64.b64encode(source.encode()).decode())
        except BaseException as raised:  # noqa: B036 - SystemExit is one of the endings under test
            error = raised
    return captured.getvalue(), error


def ending(helpers, key):
    with open(helpers.out_path(key, ".end")) as f:
        return json.load(f)


def test_the_bootstrap_travels_as_source_with_its_config_as_a_json_literal(tmp_path):
    command = dbx_repl.bootstrap_command({"session_id": "ab12", "host": "https://x\"y'z",
                                          "out_dir": str(tmp_path)})  # not the host's /tmp
    assert command.startswith("def _dbx_repl_install(config, namespace):")
    namespace = {"__name__": "__main__"}
    hooks_before = list(sys.meta_path)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(command, "<bootstrap>", "exec"), namespace)
    finally:
        sys.meta_path[:] = hooks_before
    assert printed.getvalue() in ("dbx-repl bootstrap ready fresh\n", "dbx-repl bootstrap ready again\n")
    assert "_dbx_repl_install" not in namespace
    assert namespace["_dbx_repl"].out_dir.endswith("dbx_repl_ab12")
    assert namespace["sub_llm_usage"]()["calls"] == 0


def test_a_step_is_teed_and_ends_with_the_marker_the_cli_reads(repl):
    text, error = run(repl, "001_a", "print('hello')\n6 * 7")
    assert error is None
    output, complete, images = dbx_repl.read_end_marker(text, "001_a")
    assert (output, complete, images) == ("hello\n42\n", True, 0)
    with open(repl.out_path("001_a")) as f:
        assert f.read() == "hello\n42\n"
    assert ending(repl, "001_a") == {"ending": {"kind": "finished"}, "chars": 9, "images": []}


def test_exceptions_are_recorded_as_python_prints_them(repl):
    source = ("import sys, types\nmod = sys.modules['mymod'] = types.ModuleType('mymod')\n"
              "exec('class MyError(Exception):\\n    pass', mod.__dict__)\nraise mod.MyError('a\\nb')")
    _, error = run(repl, "001_e", source)
    assert type(error).__name__ == "MyError"
    assert ending(repl, "001_e")["ending"] == {"kind": "raised", "type": "mymod.MyError", "message": "a\nb"}
    with open(repl.out_path("001_e", ".err")) as f:
        traceback_text = f.read()
    assert traceback_text.endswith("mymod.MyError: a\nb\n") and "_dbx_repl" not in traceback_text
    _, error = run(repl, "002_x", "raise SystemExit(0)")
    assert ending(repl, "002_x")["ending"] == {"kind": "raised", "type": "SystemExit", "message": "0",
                                               "exit_code": 0}


def test_an_indented_cell_is_dedented_and_a_bad_one_still_fails(repl):
    text, error = run(repl, "001_i", "    x = 2\n    print(x * 3)")
    assert error is None and text.startswith("6\n")
    _, error = run(repl, "002_i", "  x = 1\n y = 2")
    assert isinstance(error, IndentationError)


def test_a_handler_bound_in_an_earlier_step_writes_into_the_current_step(repl):
    run(repl, "001_l", "import sys\nkeep = sys.stdout")
    run(repl, "002_l", "_ = keep.write('late line\\n')")
    with open(repl.out_path("002_l")) as f:
        assert f.read() == "late line\n"
    with open(repl.out_path("001_l")) as f:
        assert f.read() == ""


def test_figures_are_saved_once_each_and_closed(repl):
    pytest.importorskip("matplotlib")
    source = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
              "fig = plt.figure(figsize=(2, 1))\ndisplay(fig)\ndisplay(fig)\nplt.figure(figsize=(1, 1))\n"
              "display([1, 2])")
    text, error = run(repl, "001_p", source)
    assert error is None
    assert dbx_repl.read_end_marker(text, "001_p")[2] == 2
    assert ending(repl, "001_p")["images"] == ["001_p.1.png", "001_p.2.png"]
    assert repl.shown == [[1, 2]]  # only the non-plot reached the REPL's display
    import matplotlib.pyplot as plt
    assert plt.get_fignums() == []
    for name in ("001_p.1.png", "001_p.2.png"):
        path = os.path.join(repl.out_dir, name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text, _ = run(repl, "002_p", "print('no plot')")
    assert dbx_repl.read_end_marker(text, "002_p")[2] == 0


def test_old_copies_are_pruned_past_the_sessions_bound(repl):
    for step in range(1, 8):
        run(repl, "%03d_big" % step, "print('x' * 999)")
    names = sorted(os.listdir(repl.out_dir))
    total = sum(os.path.getsize(os.path.join(repl.out_dir, n)) for n in names)
    assert total <= 4000 + 1100  # the bound, plus the step that ran after the last prune
    assert "007_big.out" in names and "001_big.out" not in names
    assert all(stat.S_IMODE(os.stat(os.path.join(repl.out_dir, n)).st_mode) == 0o600 for n in names)


def test_remove_copies_deletes_the_sessions_directory(repl):
    run(repl, "001_r", "print('bye')")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        repl.remove_copies()
    assert json.loads(printed.getvalue()) == {"removed": 2}
    assert not os.path.exists(repl.out_dir)
    with pytest.raises(ValueError):
        repl.remove_copies("../etc")


def test_previews_collapse_progress_frames_and_show_other_controls():
    assert dbx_repl.printable("a\r\nstep 1\rstep 2\rstep 3\ndone\x07") == "a\nstep 3\ndone\ufffd"
