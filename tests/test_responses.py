"""An answer, directly: the 2 KB fit, the one JSON line, previews and tips (section 2 of dbx_repl.py).

Pure helpers, in-process, in milliseconds: what an agent reads of every call is built here."""

import contextlib
import io
import json
import os
import shlex
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dbx_repl

LIMIT = dbx_repl.MAX_RESPONSE_BYTES


@contextlib.contextmanager
def project_at(directory):
    """A checked project in `directory`: where an oversized answer spills its fields."""
    saved = dbx_repl.Project.current
    try:
        yield dbx_repl.Project(directory).check()
    finally:
        dbx_repl.Project.current = saved


def line_bytes(body):
    return len(dbx_repl._one_line(body).encode("utf-8"))


def details_of(body, project):
    with open(os.path.join(project.root, body["details_file"]) if not os.path.isabs(body["details_file"])
              else body["details_file"], encoding="utf-8") as f:
        return json.load(f)


# -- fitting an answer into 2 KB ------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=3000)
VALUE = st.recursive(st.none() | st.integers() | st.booleans() | TEXT,
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=5),
                     max_leaves=12)
FIELD_NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=16).filter(
    lambda k: k not in ("status", "message", "hint", "details_file", "moved_fields"))
HINT = st.none() | st.text("abcdefghijklmnopqrstuvwxyz0123456789 -_./'\"", max_size=900)


@settings(max_examples=80, deadline=None)
@given(message=TEXT, fields=st.dictionaries(FIELD_NAMES, VALUE, max_size=8), hint=HINT)
def test_every_answer_fits_in_2kb_and_what_was_cut_is_kept_whole_in_the_file_it_names(message, fields, hint):
    body = {"status": "Finished", "message": message, **fields}
    if hint:
        body["hint"] = hint
    with tempfile.TemporaryDirectory() as directory, project_at(directory) as project:
        fitted = dbx_repl.fit_response(dict(body))
        assert line_bytes(fitted) <= LIMIT
        assert fitted["status"] == "Finished"
        if hint:
            assert "hint" in fitted and list(fitted)[-1] == "hint"   # the tip is never moved, and comes last
        if line_bytes(body) <= LIMIT:
            assert fitted == body and not os.listdir(directory)     # what fits is left alone
            return
        moved = fitted["moved_fields"]
        kept = details_of(fitted, project)
        assert sorted(kept) == moved
        for key in moved:                                           # the file holds the originals
            assert kept[key] == json.loads(json.dumps(body[key]))
        for key, value in body.items():                             # nothing else changed
            if key not in moved and key != "hint":
                assert fitted[key] == value


def test_a_long_message_is_cut_to_its_head_and_tail_and_stays_in_the_answer():
    message = "start of the story " + "x" * 5000 + " the end"
    with tempfile.TemporaryDirectory() as directory, project_at(directory) as project:
        fitted = dbx_repl.fit_response({"status": "Error", "message": message, "step": 3})
        assert fitted["message"].startswith("start of the story") and fitted["message"].endswith("the end")
        assert "bytes omitted" in fitted["message"] and fitted["step"] == 3
        assert fitted["moved_fields"] == ["message"] and details_of(fitted, project)["message"] == message
        assert fitted["details_file"].startswith(os.path.join(dbx_repl.OUTPUT_DIR, dbx_repl.RESPONSES_DIR)) \
            or os.path.dirname(fitted["details_file"]).endswith(os.path.join(dbx_repl.OUTPUT_DIR,
                                                                             dbx_repl.RESPONSES_DIR))


def test_a_long_text_one_level_down_is_cut_in_place():
    error = {"type": "ValueError", "message": "bad value " * 600}
    with tempfile.TemporaryDirectory() as directory, project_at(directory) as project:
        fitted = dbx_repl.fit_response({"status": "Error", "message": "Step failed.", "error": error})
        assert fitted["error"]["type"] == "ValueError" and "bytes omitted" in fitted["error"]["message"]
        assert details_of(fitted, project)["error"] == error


def test_the_largest_field_moves_first_and_small_ones_stay():
    big = [{"step": n, "tag": "t%d" % n} for n in range(200)]
    with tempfile.TemporaryDirectory() as directory, project_at(directory):
        fitted = dbx_repl.fit_response({"status": "Active", "message": "ok", "steps": big, "count": 200})
        assert fitted["moved_fields"] == ["steps"] and fitted["count"] == 200 and "steps" not in fitted


def test_without_a_project_the_cut_fields_go_to_the_system_temp_dir():
    saved = dbx_repl.Project.current
    dbx_repl.Project.current = None
    try:
        fitted = dbx_repl.fit_response({"status": "UsageError", "message": "m" * 4000})
    finally:
        dbx_repl.Project.current = saved
    path = fitted["details_file"]
    try:
        assert os.path.isabs(path) and os.path.dirname(path) == tempfile.gettempdir()
        with open(path, encoding="utf-8") as f:
            assert json.load(f) == {"message": "m" * 4000}
    finally:
        os.unlink(path)


# -- the one JSON line ------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(message=TEXT, extra=TEXT, code=st.sampled_from([0, 1, 2, 3, 130]))
def test_emit_prints_one_json_line_whatever_the_text_and_returns_the_exit_code(message, extra, code):
    body = dbx_repl.response("Finished", message or "m", exit_code=code, note=extra)
    with tempfile.TemporaryDirectory() as directory, project_at(directory), \
            contextlib.redirect_stdout(io.StringIO()) as out:
        assert dbx_repl.emit(body) == code
    lines = out.getvalue().splitlines()             # str.splitlines: the widest idea of a line break
    assert len(lines) == 1 and out.getvalue().endswith("\n")
    printed = json.loads(lines[0])
    assert "_exit" not in printed and printed["status"] == "Finished"
    assert len(lines[0].encode("utf-8")) <= LIMIT


def test_a_known_secret_never_reaches_the_printed_line(monkeypatch):
    monkeypatch.setattr(dbx_repl, "_secrets", {"dapi-s3cr3t-token"})
    with contextlib.redirect_stdout(io.StringIO()) as out:
        dbx_repl.emit(dbx_repl.response("AuthError", "token dapi-s3cr3t-token was refused",
                                        hint="check dapi-s3cr3t-token"))
    assert "s3cr3t" not in out.getvalue() and out.getvalue().count("***") == 2


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_a_console_that_cannot_print_unicode_gets_the_same_json_in_ascii(text):
    line = dbx_repl._one_line({"status": "Finished", "message": text})

    class Ascii(io.StringIO):
        encoding = "ascii"

    with contextlib.redirect_stdout(Ascii()):
        shown = dbx_repl.for_console(line)
    assert shown.isascii() and json.loads(shown) == json.loads(line)


def test_response_puts_status_and_message_first_drops_none_and_ends_with_the_hint():
    body = dbx_repl.response("Running", "still running", hint="run await", exit_code=3, step=2, missing=None)
    assert list(body) == ["status", "message", "step", "hint", "_exit"] and body["_exit"] == 3
    error = dbx_repl.ReplError("InvalidTag", "bad tag", hint="use a slug", exit_code=2, tag="!!")
    assert error.response() == {"status": "InvalidTag", "message": "bad tag", "tag": "!!", "hint": "use a slug",
                                "_exit": 2}


# -- previews ------------------------------------------------------------------------------------------

PLAIN = st.text(st.characters(whitelist_categories=("Lu", "Ll", "Nd", "Zs", "Lo")) | st.just("\n"), max_size=4000)


@settings(max_examples=150)
@given(text=PLAIN, limit=st.integers(50, 1500))
def test_a_preview_shows_a_head_and_a_tail_and_counts_exactly_the_bytes_left_out(text, limit):
    shown = dbx_repl.preview(text, limit=limit)
    if len(text) <= limit:
        assert shown == text
        return
    head, rest = shown.split("[... ", 1)
    omitted, tail = rest.split(" bytes omitted ...]\n", 1)
    head = head[:-1] if head.endswith("\n") and not text.startswith(head) else head
    assert text.startswith(head) and text.endswith(tail)
    assert len(head) <= limit * 6 // 10 and len(tail) <= limit * 3 // 10
    assert int(omitted) == len(text.encode()) - len(head.encode()) - len(tail.encode())


def test_a_preview_of_many_lines_cuts_at_line_boundaries():
    text = "".join("line %04d\n" % n for n in range(500))
    head, tail = dbx_repl.preview(text, limit=300).split("\n[... ")
    tail = tail.split("]\n", 1)[1]
    lines = set(text.splitlines())
    assert head.startswith("line 0000\n") and tail.endswith("line 0499\n")
    assert set(head.splitlines()) <= lines and set(tail.splitlines()) <= lines   # whole lines only


@given(st.text(max_size=300))
def test_printable_text_has_no_escape_sequences_or_stray_controls_and_is_stable(text):
    shown = dbx_repl.printable(text)
    assert "\x1b" not in shown and "\r" not in shown
    assert all(c in "\n\t" or not (ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f) for c in shown)
    assert "\u2028" not in shown and "\u2029" not in shown
    assert dbx_repl.printable(shown) == shown


def test_printable_keeps_the_last_frame_of_a_progress_bar_and_drops_colours():
    assert dbx_repl.printable("\x1b[32m10%\r50%\r100%\x1b[0m\r\ndone") == "100%\ndone"


@settings(max_examples=100, deadline=None)
@given(text=PLAIN, limit=st.integers(50, 400))
def test_a_file_preview_matches_the_preview_of_its_text_when_small(text, limit):
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(text.encode())
    try:
        shown = dbx_repl.file_preview(f.name, limit=limit)
        if len(text.encode()) <= limit * 4:
            assert shown == dbx_repl.preview(text, limit, total_bytes=len(text.encode()))
        else:
            assert "bytes omitted" in shown and len(shown) <= limit + 60
    finally:
        os.unlink(f.name)


def test_a_large_file_preview_counts_the_omitted_bytes_of_the_whole_file(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"a" * 1_000_000)
    shown = dbx_repl.file_preview(str(path), limit=100)
    head, rest = shown.split("\n[... ")
    omitted, tail = rest.split(" bytes omitted ...]\n")
    assert int(omitted) + len(head) + len(tail) == 1_000_000


@given(st.recursive(st.text(st.characters(), max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                 max_size=3), max_leaves=8))
def test_any_value_becomes_writable_as_utf8_and_valid_text_is_unchanged(value):
    clean = dbx_repl.valid_unicode(value)
    json.dumps(clean, ensure_ascii=False).encode("utf-8")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return
    assert clean == value


# -- tips ----------------------------------------------------------------------------------------------

PATHS = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40)


@settings(max_examples=200)
@given(project_dir=PATHS, profile=st.none() | PATHS, timeout=st.none() | st.floats(0.1, 1e5),
       subcommand=st.sampled_from(["exec", "await", "status", "replay", "export", "destroy", "get"]))
def test_a_tip_runs_as_written_with_the_project_profile_and_timeout(project_dir, profile, timeout, subcommand):
    saved = (dbx_repl.Invocation.program, dbx_repl.Invocation.profile, dbx_repl.Invocation.timeout)
    dbx_repl.Invocation.program, dbx_repl.Invocation.profile = "python3 '/opt/my skills/dbx_repl.py'", profile
    dbx_repl.Invocation.timeout = timeout
    try:
        words = shlex.split(dbx_repl.cli_hint(subcommand, dbx_repl.Project(project_dir)))
    finally:
        dbx_repl.Invocation.program, dbx_repl.Invocation.profile, dbx_repl.Invocation.timeout = saved
    assert words[:3] == ["python3", "/opt/my skills/dbx_repl.py", subcommand]
    assert words[words.index("--project-dir") + 1] == project_dir
    assert (words[words.index("--profile") + 1] == profile) if profile else "--profile" not in words
    if subcommand in dbx_repl.WAITING_SUBCOMMANDS:                 # within an agent's tool limit when not given
        assert float(words[words.index("--timeout") + 1]) == pytest.approx(timeout or dbx_repl.TIP_TIMEOUT, rel=1e-5)
    else:
        assert "--timeout" not in words
