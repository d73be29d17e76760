"""Which files `sync` sends: the folder's .gitignore rules, directly (gitignore_rules, ignored, local_tree).

The rules are a documented subset of git's; where they overlap, git itself is the oracle."""

import hashlib
import os
import subprocess
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dbx_repl


def tree(root, files):
    """Write {relative path: text} under root."""
    for relative, text in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def synced(root, gitignore=None, max_bytes=10 ** 9):
    if gitignore is not None:
        tree(root, {".gitignore": gitignore})
    return sorted(dbx_repl.local_tree(str(root), max_bytes))


def test_git_folders_caches_and_bytecode_are_never_sent(tmp_path):
    tree(tmp_path, {"pkg/__init__.py": "", "pkg/__pycache__/m.cpython-311.pyc": "x", "pkg/old.pyc": "x",
                    ".git/HEAD": "ref", ".DS_Store": "x", "pkg/sub/.DS_Store": "x", "pkg/m.py": "x = 1"})
    assert synced(tmp_path) == ["pkg/__init__.py", "pkg/m.py"]


def test_gitignore_skips_comments_and_blank_lines_and_the_last_matching_rule_decides(tmp_path):
    tree(tmp_path, {"a.log": "", "keep.log": "", "notes/todo.md": "", "src/notes/x.py": "", "#x": ""})
    assert synced(tmp_path, "# logs\n\n*.log\n!keep.log\nnotes/\n") == ["#x", ".gitignore", "keep.log"]


def test_a_trailing_slash_ignores_directories_only(tmp_path):
    tree(tmp_path, {"build/out.bin": "", "src/build": "a file named build"})
    assert synced(tmp_path, "build/\n") == [".gitignore", "src/build"]


def test_a_pattern_with_a_slash_is_anchored_at_the_folder_and_one_without_matches_at_any_depth(tmp_path):
    tree(tmp_path, {"docs/a.md": "", "src/docs/a.md": "", "x.tmp": "", "deep/er/y.tmp": ""})
    assert synced(tmp_path, "/docs/*.md\n*.tmp\n") == [".gitignore", "src/docs/a.md"]


def test_an_ignored_directory_hides_what_a_later_rule_re_includes_in_it_as_git_does(tmp_path):
    tree(tmp_path, {"data/keep.csv": "", "data/big.csv": ""})
    assert synced(tmp_path, "data/\n!data/keep.csv\n") == [".gitignore"]


def test_the_tree_holds_each_files_digest_and_size(tmp_path):
    tree(tmp_path, {"m.py": "print('hi')\n", "sub/n.py": ""})
    found = dbx_repl.local_tree(str(tmp_path), 100)
    assert found == {"m.py": (hashlib.sha256(b"print('hi')\n").hexdigest(), 12),
                     "sub/n.py": (hashlib.sha256(b"").hexdigest(), 0)}


def test_a_folder_over_the_cap_is_refused_before_anything_is_sent(tmp_path):
    tree(tmp_path, {"a.py": "x" * 600, "b.py": "y" * 600})
    with pytest.raises(dbx_repl.ReplError) as refused:
        dbx_repl.local_tree(str(tmp_path), 1000)
    assert refused.value.status == "TooLarge" and "--max-bytes" in refused.value.hint
    assert synced(tmp_path, None, max_bytes=1200) == ["a.py", "b.py"]


def test_a_linked_directory_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    tree(outside, {"secret.txt": "x"})
    tree(tmp_path / "pkg", {"m.py": ""})
    os.symlink(outside, tmp_path / "pkg" / "linked")
    assert synced(tmp_path / "pkg") == ["m.py"]


def test_an_unreadable_gitignore_leaves_only_the_fixed_rules(tmp_path):
    (tmp_path / ".gitignore").write_bytes(b"\xff\xfe*.py\n")
    assert dbx_repl.gitignore_rules(str(tmp_path)) == dbx_repl.gitignore_rules(str(tmp_path / "none"))


@pytest.mark.parametrize("local, name", [("/work/src/my pkg", "my_pkg"), ("rel/dir/", "dir"), ("/a/b.v2", "b.v2")])
def test_a_synced_folder_is_named_by_its_last_folder_as_a_safe_slug(local, name):
    assert dbx_repl.sync_name(local) == name


def test_a_folder_without_a_usable_name_is_refused():
    with pytest.raises(dbx_repl.ReplError) as refused:
        dbx_repl.sync_name("/")
    assert refused.value.status == "InvalidPath"


# -- against git ------------------------------------------------------------------------------------

SEGMENTS = ("a", "b", "ab", "x.py", "y.log")
PATHS = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map("/".join)
GLOBS = st.sampled_from(["a", "b", "ab", "x.py", "y.log", "*.py", "*.log", "a*", "?b", "*"])
RULES = st.tuples(st.booleans(), st.booleans(), st.one_of(GLOBS, PATHS.map(lambda p: "/" + p))).map(
    lambda r: ("!" if r[0] else "") + r[2] + ("/" if r[1] else ""))


def git_would_add(root):
    subprocess.run(["git", "init", "-q", root], check=True, capture_output=True)
    listed = subprocess.run(["git", "-C", root, "ls-files", "--others", "--exclude-standard", "-z"], check=True,
                            capture_output=True, text=True).stdout
    return sorted(p for p in listed.split("\0") if p)


@settings(max_examples=40, deadline=None)
@given(files=st.sets(PATHS, min_size=1, max_size=8), rules=st.lists(RULES, max_size=6))
def test_sync_sends_what_git_would_track_for_plain_names_globs_and_anchored_paths(files, rules):
    """Patterns of git's syntax that the subset shares (names and globs at any depth, anchored paths
    without wildcards, `!`, a trailing `/`): sync sends the files git would add."""
    with tempfile.TemporaryDirectory() as root:
        layout = {}
        for path in sorted(files, key=len):
            if not any(other.startswith(path + "/") for other in files):   # a path is a file or a folder
                layout[path] = "x"
        tree(root, layout)
        tree(root, {".gitignore": "\n".join(rules) + "\n"})
        assert synced(root) == git_would_add(root), (rules, layout)   # its .git/ is never sent
