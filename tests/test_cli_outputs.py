"""Outputs an agent can trust: full text on disk, tables, images, errors, previews and `outputs`.

Every test runs the CLI as a subprocess against the local workspace, whose service cuts text at
50,000 characters, caps tables at 10,000 rows, returns plots as data URLs (or FileStore paths), and
sends errors as an HTML summary plus an ANSI-coloured traceback.
"""

import csv
import json
import os
import random
import re
import struct
import zlib

import pytest

from local_workspace import LocalWorkspace
from repl_harness import ROOT, Repl, printed_so_far, wait_for

pytestmark = pytest.mark.xdist_group("cli_outputs")   # one worker runs the module: its module-scoped workspace starts once

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OMITTED = re.compile(r"\[\.\.\. (\d+) bytes omitted \.\.\.\]")
CUT_MARKER = re.compile(rb"\n\[dbx-repl: output cut at (\d+) of (\d+) bytes \(--max-output-bytes\)\]\n$")
ALPHABET_500K = "print(''.join(chr(97 + i % 26) for i in range(500_000)))"
EXPECTED_500K = "".join(chr(97 + i % 26) for i in range(500_000)) + "\n"


def by_kind(call):
    return {o["kind"]: o for o in call["outputs"]}


def assert_outputs_match_disk(session, call):
    """Every listed file exists with the listed size, and every file of the step is listed."""
    listed = {o["path"] for o in call["outputs"]}
    for item in call["outputs"]:
        assert os.path.getsize(session.path(item["path"])) == item["bytes"], item
    outputs_dir = os.path.join(session.project_dir, "repl_outputs")
    on_disk = {name for name in os.listdir(outputs_dir) if name.startswith(call["cmd_id"] + ".")}
    assert {os.path.basename(p) for p in listed} == on_disk


def png_size(data):
    """(width, height) from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16:16 + length]
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc
    return struct.unpack(">II", body[:8])


def assert_decodes_as_image(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    with open(path, "rb") as f:
        width, height = png_size(f.read())
    assert pixels.shape[:2] == (height, width) and width > 100 and height > 100
    assert pixels.std() > 0  # a real plot, not a blank canvas
    return width, height


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One session for the tests that need no workspace settings of their own (each CLI call costs
    about a second, so a session per test would make this file slow). Tests that configure or
    inject use the per-test `workspace`/`session` fixtures."""
    ws = LocalWorkspace()
    ws.start()
    root = tmp_path_factory.mktemp("shared")
    (root / "project").mkdir()
    (root / "home").mkdir()
    repl = Repl(ws, root / "project", root / "home")
    try:
        created = repl.create()
        assert created.status == "Created", created
        yield repl
        assert repl.run("destroy").status == "Destroyed"
    finally:
        ws.stop()
        for pid in ws.all_pids():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


# -- full text output ---------------------------------------------------------------------------------

def test_a_500k_character_print_arrives_whole_though_the_service_cuts_at_50k(shared):
    assert shared.workspace.config["output_limit"] == 50_000
    call = shared.exec(ALPHABET_500K, "big")
    assert call.status == "Finished" and call.code == 0, call
    assert shared.read(call["stdout_file"]) == EXPECTED_500K
    assert call["stdout_bytes"] == 500_001 and call["truncated"] is False
    assert "stdout_total_bytes" not in call.body
    assert by_kind(call)["stdout"]["bytes"] == 500_001


def test_max_output_bytes_caps_the_file_with_a_marker_and_says_truncated(shared):
    call = shared.exec(ALPHABET_500K, "capped", "--max-output-bytes", "100000")
    assert call.status == "Finished" and call.code == 0
    assert call["truncated"] is True and call["stdout_total_bytes"] == 500_001
    assert "500001" in call["message"] and "100000" in call["message"]
    data = shared.read(call["stdout_file"], "rb")
    assert data.startswith(EXPECTED_500K[:100_000].encode())
    assert CUT_MARKER.search(data).groups() == (b"100000", b"500001")
    assert len(data) == call["stdout_bytes"] < 100_200
    assert "output cut at 100000 of 500001 bytes" in call["stdout_preview"]


def test_a_short_output_over_the_cap_is_cut_with_the_same_marker(shared):
    call = shared.exec("print('abc' * 10)", "tiny", "--max-output-bytes", "10")
    assert call["truncated"] is True and call["stdout_total_bytes"] == 31
    data = shared.read(call["stdout_file"], "rb")
    assert data.startswith(b"abcabcabca\n[dbx-repl:")
    assert CUT_MARKER.search(data).groups() == (b"10", b"31")


def test_output_at_and_around_the_service_limit_is_exact(shared):
    for size in (50_000, 50_001):  # print adds the newline: 50,000 characters is the limit
        call = shared.exec(f"print('x' * {size - 1})", f"edge{size}")
        assert call.status == "Finished" and call["truncated"] is False
        assert shared.read(call["stdout_file"]) == "x" * (size - 1) + "\n"
        assert call["stdout_bytes"] == size


def test_a_trailing_expression_value_lands_in_stdout_after_printed_text(shared):
    call = shared.exec("x = 6\nprint('computing')\nx * 7", "expr")
    assert shared.read(call["stdout_file"]) == "computing\n42\n"
    assert call["stdout_preview"] == "computing\n42\n"
    quoted = shared.exec("print(repr(None))\n'a' * 3", "repr")
    assert shared.read(quoted["stdout_file"]) == "None\n'aaa'\n"


def test_undecodable_output_never_crashes_the_cli(shared):
    lone = shared.exec("print('x\\udcff y')", "surrogate")
    assert lone.status == "Finished" and lone.code == 0
    assert shared.read(lone["stdout_file"], "rb") == b"x? y\n"

    # the same, past the service limit, so the text comes from the driver copy
    many = shared.exec("print('\\udcff' * 60_000)", "surrogates")
    assert many.status == "Finished" and many["truncated"] is False
    assert shared.read(many["stdout_file"], "rb") == b"?" * 60_000 + b"\n"

    raw = shared.exec("import sys\n_ = sys.stdout.write(bytes(range(256)).decode('latin-1'))", "latin1")
    assert raw.status == "Finished"
    assert shared.read(raw["stdout_file"], "rb") == bytes(range(256)).decode("latin-1").encode("utf-8")
    # C1 controls such as \x85 (NEL) never reach the one-line JSON response raw
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]", raw["stdout_preview"])
    assert "\x1b" not in raw.stdout

    failed = shared.exec("raise ValueError('bad \\udcff byte')", "badmsg")
    assert failed.status == "Error" and failed["error"] == {"type": "ValueError", "message": "bad ? byte"}
    assert "?" in shared.read(failed["stderr_file"])


def test_ansi_colours_in_output_stay_in_the_file_but_not_in_the_preview(shared):
    call = shared.exec("print('\\x1b[31mred\\x1b[0m plain\\r\\nnext')", "colour")
    assert shared.read(call["stdout_file"], "rb") == b"\x1b[31mred\x1b[0m plain\r\nnext\n"
    assert call["stdout_preview"] == "red plain\nnext\n"
    assert "\\u001b" not in call.stdout


# -- tables -------------------------------------------------------------------------------------------

TABLE_5000 = """
import pandas as pd
df = pd.DataFrame({'id': range(5000), 'score': [i / 4 for i in range(5000)],
                   'name': ['row-%d' % i for i in range(5000)], 'even': [i % 2 == 0 for i in range(5000)]})
display(df)
"""


def test_a_5000_row_display_lands_as_a_table_file_with_every_row(shared):
    call = shared.exec(TABLE_5000, "table")
    assert call.status == "Finished" and call.code == 0, call
    table = call["table"]
    assert table["rows"] == 5000 and table["columns"] == 4 and table["truncated"] is False
    assert table["column_names"] == ["id", "score", "name", "even"]
    assert table["file"] == os.path.join("repl_outputs", call["cmd_id"] + ".table.csv")

    with open(shared.path(table["file"]), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "score", "name", "even"] and len(rows) == 5001
    assert rows[1] == ["0", "0.0", "row-0", "True"] and rows[-1] == ["4999", "1249.75", "row-4999", "False"]
    assert [int(r[0]) for r in rows[1:]] == list(range(5000))

    saved = json.loads(shared.read(by_kind(call)["table_json"]["path"]))
    assert [c["name"] for c in saved["columns"]] == ["id", "score", "name", "even"]
    assert [c["type"] for c in saved["columns"]] == ["long", "double", "string", "boolean"]
    assert len(saved["rows"]) == 5000 and saved["rows"][4999] == [4999, 1249.75, "row-4999", False]
    assert saved["truncated"] is False

    stdout = shared.read(call["stdout_file"])
    assert stdout.splitlines()[0].split() == ["id", "|", "score", "|", "name", "|", "even"]
    assert "row-19" in stdout and "row-20" not in stdout and "... 4980 more rows" in stdout
    assert by_kind(call)["table"]["rows"] == 5000
    assert len(call.stdout) < 2048


def test_a_12000_row_table_reports_that_the_service_truncated_it(shared):
    call = shared.exec("display([{'n': i, 'sq': i * i} for i in range(12_000)])", "wide")
    assert call.status == "Finished"
    assert call["table"]["truncated"] is True and call["table"]["rows"] == 10_000
    assert by_kind(call)["table"]["truncated"] is True
    saved = json.loads(shared.read(by_kind(call)["table_json"]["path"]))
    assert saved["truncated"] is True and len(saved["rows"]) == 10_000
    assert saved["rows"][-1] == [9999, 9999 * 9999]


def test_print_then_display_keeps_both_the_text_and_the_table(shared):
    call = shared.exec("print('loading rows')\nprint('done')\ndisplay([[1, 'a'], [2, 'b']], columns=['k', 'v'])",
                        "mixed")
    assert call.status == "Finished"
    stdout = shared.read(call["stdout_file"])
    assert stdout.startswith("loading rows\ndone\n\n")
    assert stdout.splitlines()[3:] == ["k | v", "--+--", "1 | a", "2 | b"]
    assert call["table"]["rows"] == 2 and call["stdout_preview"] == stdout
    assert shared.read(call["table"]["file"]).splitlines() == ["k,v", "1,a", "2,b"]


# -- images -------------------------------------------------------------------------------------------

PLOT = """
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import math
fig, ax = plt.subplots(figsize=(4, 3))
ax.plot([math.sin(i / 10) for i in range(200)])
ax.set_title('sine')
plt.show()
"""


@pytest.fixture
def images_mode(shared):
    """Figures come back as images (plots_mode="images"), for one test."""
    shared.workspace.configure(plots_mode="images")
    yield shared
    shared.workspace.configure(plots_mode="repr")


def test_a_matplotlib_plot_lands_as_a_valid_png(images_mode):
    shared = images_mode
    before = len(dbfs_reads(shared.workspace))
    call = shared.exec(PLOT, "plot")
    assert call.status == "Finished", call
    assert call["images"] == [os.path.join("repl_outputs", call["cmd_id"] + ".1.png")]
    path = shared.path(call["images"][0])
    assert assert_decodes_as_image(path) == (400, 300)
    assert by_kind(call)["image"]["bytes"] == os.path.getsize(path)
    assert len(dbfs_reads(shared.workspace)) == before  # inline: no DBFS read needed
    assert_outputs_match_disk(shared, call)


def dbfs_reads(workspace):
    return [r for r in workspace.requests() if r["path"] == "/api/2.0/dbfs/read"]


@pytest.fixture
def small_inline_limit(shared):
    """Plots over 1,000 bytes come back as FileStore paths, for one test."""
    shared.workspace.configure(image_inline_limit=1000, plots_mode="images")
    yield shared
    shared.workspace.configure(image_inline_limit=512 * 1024, plots_mode="repr")


def test_a_large_plot_comes_from_the_driver_even_when_the_service_would_send_a_filestore_path(small_inline_limit):
    shared = small_inline_limit
    before = len(dbfs_reads(shared.workspace))
    call = shared.exec(PLOT, "bigplot")
    assert call.status == "Finished", call
    assert call["images"] == [os.path.join("repl_outputs", call["cmd_id"] + ".1.png")]
    assert assert_decodes_as_image(shared.path(call["images"][0])) == (400, 300)
    assert dbfs_reads(shared.workspace)[before:] == []  # the bootstrap saved it: no DBFS read
    assert "unfetched_images" not in call.body


SERVICE_IMAGE = PLOT.replace("plt.show()", "_dbx_repl.service_display(fig)\nplt.close(fig)")


def test_an_image_the_repl_returns_itself_is_fetched_through_dbfs(small_inline_limit):
    shared = small_inline_limit
    before = len(dbfs_reads(shared.workspace))
    call = shared.exec(SERVICE_IMAGE, "serviceplot")
    assert call.status == "Finished", call
    assert call["images"] == [os.path.join("repl_outputs", call["cmd_id"] + ".1.png")]
    assert assert_decodes_as_image(shared.path(call["images"][0])) == (400, 300)
    reads = dbfs_reads(shared.workspace)[before:]
    assert reads and all(r["status"] == 200 for r in reads)


def test_a_filestore_image_that_cannot_be_read_is_reported_by_path(small_inline_limit):
    shared = small_inline_limit
    before = len(dbfs_reads(shared.workspace))
    shared.workspace.inject("/api/2.0/dbfs/read", method="GET", count=1, status=404, retry_after=None,
                            body={"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "No file"})
    call = shared.exec(SERVICE_IMAGE, "lost")
    assert call.status == "Finished" and call["images"] == []
    assert len(call["unfetched_images"]) == 1
    assert re.fullmatch(r"/plots/[0-9a-f-]+\.png", call["unfetched_images"][0])
    assert "could not be fetched" in call["message"]
    assert "image" not in by_kind(call)
    assert [r["status"] for r in dbfs_reads(shared.workspace)[before:]] == [404]


# -- errors -------------------------------------------------------------------------------------------

def test_division_by_zero_is_reported_without_html_or_escape_bytes(shared):
    call = shared.exec("print('before')\n1/0", "boom")
    assert call.status == "Error" and call.code == 1
    assert call["error"] == {"type": "ZeroDivisionError", "message": "division by zero"}
    assert call["message"] == "The command raised ZeroDivisionError: division by zero"
    assert call["stderr_preview"].rstrip().endswith("ZeroDivisionError: division by zero")
    for text in (call.stdout, call.stderr):
        assert "\x1b" not in text and "\\u001b" not in text and "<span" not in text
    step_files = [shared.path(o["path"]) for o in call["outputs"]]
    for path in step_files + [os.path.join(shared.project_dir, "session.json")]:
        with open(path, "rb") as f:
            assert b"\x1b" not in f.read(), path
    stderr = shared.read(call["stderr_file"])
    assert stderr.startswith("Traceback") and "1/0" in stderr and "_dbx_repl" not in stderr
    assert shared.read(call["stdout_file"]) == "before\n"
    assert by_kind(call)["stderr"]["bytes"] == call["stderr_bytes"] == len(stderr.encode())


def test_error_messages_are_unescaped_and_long_tracebacks_keep_their_last_lines(shared):
    code = ("def ping(n):\n"                      # alternating frames: nothing is collapsed
            "    if n == 0:\n"
            "        raise KeyError('a < b & \"c\"')\n"
            "    return pong(n - 1)\n"
            "def pong(n):\n"
            "    return ping(n)\n"
            "ping(60)")
    call = shared.exec(code, "deep")
    assert call.status == "Error"
    assert call["error"]["type"] == "KeyError"
    assert call["error"]["message"] == "'a < b & \"c\"'"
    preview = call["stderr_preview"]
    assert call["stderr_bytes"] > 4000 and len(preview) <= 1000
    omitted = int(OMITTED.search(preview).group(1))
    head, tail = OMITTED.split(preview)[0], OMITTED.split(preview)[2]
    assert len(head.encode()) + len(tail.encode()) - 1 + omitted == call["stderr_bytes"]
    assert tail.rstrip().endswith("KeyError: 'a < b & \"c\"'")
    assert preview.startswith("Traceback (most recent call last):\n")


@pytest.mark.slow
def test_a_cancel_that_finishes_as_an_error_is_reported_as_cancelled(workspace, session):
    workspace.configure(cancel_mode="finished_error")
    waiting = session.popen("exec", "--command", "import time\nprint('started', flush=True)\ntime.sleep(60)",
                            "--tag", "nap")
    assert wait_for(lambda: printed_so_far(session, "001_nap") == "started\n", 15)
    cancel = session.run("cancel")
    assert cancel.status == "Cancelled", cancel
    call = session.finish(waiting)
    assert call.status == "Cancelled" and "error" not in call.body, call
    assert call["stderr_bytes"] == 0
    assert [s["status"] for s in session.session()["steps"]] == ["Cancelled"]
    assert session.exec("print('alive')", "after")["stdout_preview"] == "alive\n"


# -- previews and response size -----------------------------------------------------------------------

def test_previews_show_whole_lines_from_head_and_tail_with_an_exact_omitted_count(shared):
    call = shared.exec("for i in range(2000):\n    print('line', i)", "lines")
    preview = call["stdout_preview"]
    assert len(preview) <= 1000
    head, count, tail = OMITTED.split(preview)
    assert head.startswith("line 0\nline 1\n") and head.endswith("\n")
    assert tail.startswith("\n") and tail.endswith("line 1999\n")
    lines = head.splitlines() + tail.splitlines()[1:]
    assert all(re.fullmatch(r"line \d+", line) for line in lines), lines
    assert len(head.encode()) + len(tail.encode()) - 1 + int(count) == call["stdout_bytes"]


@pytest.mark.slow
def test_a_10mb_output_gives_a_response_under_2kb(shared):
    call = shared.exec("for i in range(200_000):\n    print('row %07d ' % i + 'x' * 40)", "huge")
    assert call.status == "Finished" and call["truncated"] is False
    assert call["stdout_bytes"] == 200_000 * 53 > 10_000_000
    assert len(call.stdout.encode("utf-8")) < 2048
    with open(shared.path(call["stdout_file"]), "rb") as f:
        data = f.read()
    assert data.count(b"\n") == 200_000 and data.endswith(b"row 0199999 " + b"x" * 40 + b"\n")


def test_outputs_lists_every_file_of_a_step_with_kind_and_size(shared):
    call = shared.exec("print('summary')\n" + TABLE_5000, "report")
    assert_outputs_match_disk(shared, call)
    kinds = [o["kind"] for o in call["outputs"]]
    assert kinds == ["command", "stdout", "stderr", "table", "table_json"]
    table = by_kind(call)["table"]
    assert (table["rows"], table["columns"], table["truncated"]) == (5000, 4, False)
    assert shared.read(by_kind(call)["command"]["path"]) == "print('summary')\n" + TABLE_5000
    logged = shared.session()["steps"][-1]["outputs"]
    assert [o["kind"] for o in logged] == ["table", "table_json"]


@pytest.mark.slow
def test_full_output_still_arrives_when_the_repl_cannot_display_tables(workspace, session, tmp_path):
    # Chunks normally travel as table results; without display() they fall back to text results,
    # each small enough for the service's 50,000-character cut.
    assert session.exec("del display", "no_display").status == "Finished"
    noise = random.Random(7)   # hard to compress, so one chunk would not fit in one text result
    text = "".join("line %06d %032x\n" % (i, noise.getrandbits(128)) for i in range(6000))
    script = tmp_path / "big.py"
    script.write_text(f"print({text!r}, end='')")
    executes = lambda: sum(r["path"] == "/api/1.2/commands/execute" for r in workspace.requests())
    before = executes()
    call = session.exec(f"@{script}", "big")
    assert call.status == "Finished" and call["truncated"] is False
    assert session.read(call["stdout_file"]) == text
    assert executes() - before >= 1 + 1 + 4   # the step, one cut table-mode try, several text chunks


def test_the_frame_carries_the_record_and_a_checked_inline_copy():
    import hashlib
    import dbx_repl
    copy = "hi\n"
    record = {"key": "001_a", "bytes": 3, "sha256": hashlib.sha256(copy.encode()).hexdigest(), "inline": True}
    frame = dbx_repl.FRAME + json.dumps(record) + "\n" + copy + dbx_repl.FRAME_END
    assert dbx_repl.read_frame(frame, "001_a") == ("", record, copy)
    # text the REPL showed beside the frame (a handler bound before the session) is kept apart
    assert dbx_repl.read_frame("WARN x\n" + frame, "001_a") == ("WARN x\n", record, copy)
    assert dbx_repl.read_frame(frame, "002_b") == (frame, None, None)          # another step's frame
    assert dbx_repl.read_frame(frame[:-5], "001_a") == ("", record, None)       # the service cut the end
    assert dbx_repl.read_frame("no frame at all", "001_a") == ("no frame at all", None, None)


@pytest.mark.slow
def test_a_failed_output_fetch_keeps_the_step_and_names_the_get_for_the_driver_copy(workspace, session):
    text_size = 120_000  # over the 50,000-character cut, so the CLI must fetch the rest
    proc = session.popen("exec", "--command", f"import time\ntime.sleep(1)\nprint('y' * {text_size})",
                         "--tag", "big")
    assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
    workspace.inject("/api/1.2/commands/execute", method="POST", count=1, status=400,
                     body={"error": "java.lang.RuntimeException: injected fetch failure"})
    call = session.finish(proc)
    assert call.status == "Finished" and call["truncated"] is True
    assert "Could not fetch the full output" in call["message"]
    program_then_get = f" {ROOT} get "
    assert program_then_get in call["message"], call["message"]
    get_command = ["get", *call["message"].split(program_then_get)[-1].split()]
    assert session.session()["steps"][-1]["status"] == "Finished"
    copied = session.run(*get_command)
    assert copied.status == "Downloaded", copied
    assert session.read(copied["local"]) == "y" * text_size + "\n"


@pytest.mark.slow
def test_steps_still_run_and_fetch_after_the_driver_temp_dir_was_cleaned(session):
    assert session.exec("import shutil\nshutil.rmtree(_dbx_repl.out_dir)", "clean_tmp").status == "Finished"
    call = session.exec("print('z' * 60000)", "after_cleanup")
    assert call.status == "Finished" and call["truncated"] is False
    assert session.read(call["stdout_file"]) == "z" * 60000 + "\n"
