"""What an agent reads: SKILL.md and the references it links. Every status the CLI can answer is
documented with its exit code, the byte budgets hold, every reference that ships is linked, and no
document an agent reads points at a developers' document (tests/, docs/), which a skill does not ship."""

import os
import re

import dbx_repl
from repl_harness import ROOT, statuses_in_the_cli

SKILL_MD = os.path.join(ROOT, "SKILL.md")
REFERENCES = os.path.join(ROOT, "references")
STATUSES_MD = os.path.join(REFERENCES, "statuses.md")
SKILL_MD_MAX_BYTES = 10_240
REFERENCES_MAX_BYTES = 40_960
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
DEVELOPER_PATH = re.compile(r"(?<![\w.-])(?:\.\./)*(?:tests|docs)/")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _agent_documents():
    """SKILL.md and every file under references/."""
    return [SKILL_MD] + sorted(os.path.join(REFERENCES, name) for name in os.listdir(REFERENCES))


def _linked_references():
    """The references/*.md files SKILL.md links, by name."""
    targets = (target.split("#")[0] for target in MARKDOWN_LINK.findall(_read(SKILL_MD)))
    return {target[len("references/"):] for target in targets
            if target.startswith("references/") and target.endswith(".md")}


def test_every_status_the_cli_can_answer_is_documented_in_statuses_md():
    statuses = statuses_in_the_cli()
    # the collector reads every form: answers, driver-call failures, verify and step-record statuses
    assert {"Running", "ContextEvicted", "RemoteFileError", "TimedOut", "Evicted", "Finished"} <= statuses
    text = _read(STATUSES_MD)
    missing = sorted(status for status in statuses if f"`{status}`" not in text)
    assert not missing, missing


def test_statuses_md_gives_the_exit_codes_the_tip_timeout_and_the_one_cancelling_window():
    text = _read(STATUSES_MD)
    exits = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in (dbx_repl.EXIT_OK, dbx_repl.EXIT_FAILED, dbx_repl.EXIT_USAGE, dbx_repl.EXIT_RUNNING,
                 dbx_repl.EXIT_INTERRUPTED):
        assert f"\n| {code} |" in exits, code
    for status in ("Running", "StatusUnknown", "ClusterStarting"):   # exit 3: still running
        assert f"`{status}`" in exits.split(f"| {dbx_repl.EXIT_RUNNING} |", 1)[1].split("\n", 1)[0], status
    assert f"{dbx_repl.TIP_TIMEOUT:g} s" in text
    window = f"{dbx_repl.CANCEL_WAIT_SECONDS:g} s"
    for path in _agent_documents():
        for line in _read(path).splitlines():
            if "Cancelling" in line:
                seconds = re.findall(r"\b(\d+) ?s\b", line)
                assert all(f"{s} s" == window for s in seconds), (path, line)


def test_skill_md_stays_within_its_budget_and_never_passes_an_empty_profile():
    text = _read(SKILL_MD)
    assert len(text.encode("utf-8")) <= SKILL_MD_MAX_BYTES
    assert "--profile $0" not in text                          # breaks when the profile argument is empty
    assert text.count('--profile="$0"') >= 2                    # an empty value means the default auth


def test_the_references_skill_md_links_exist_and_every_reference_is_linked():
    linked = _linked_references()
    shipped = set(os.listdir(REFERENCES))
    assert linked and not linked - shipped, linked - shipped   # every link resolves
    assert not shipped - linked, shipped - linked               # nothing unlinked ships


def test_the_references_stay_within_their_budget():
    total = sum(os.path.getsize(os.path.join(REFERENCES, name)) for name in os.listdir(REFERENCES))
    assert total <= REFERENCES_MAX_BYTES, total


def test_no_document_an_agent_reads_points_outside_the_skill_or_at_a_developers_document():
    for path in _agent_documents():
        text = _read(path)
        assert not DEVELOPER_PATH.search(text), (path, DEVELOPER_PATH.search(text).group(0))
        for target in MARKDOWN_LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue                                     # a web address, or a heading of the same file
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
            assert os.path.isfile(resolved), (path, target)
            assert os.path.dirname(resolved) in (ROOT, REFERENCES), (path, target)
