"""What a step defines and uses, the replay plan and the export script, directly (section 6 of dbx_repl.py).

Pure functions of the step log and the steps' code: each test writes a session's files under a temp
dir and calls them in-process. The properties run the generated steps' Python here, so "the plan
restores what the step needs" is checked by running it, not by re-deriving the planner's answer."""

import ast
import contextlib
import json
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dbx_repl


# -- a session on disk -------------------------------------------------------------------------------

@contextlib.contextmanager
def recorded(steps):
    """A project holding `steps` ({"code", "tag", "status"="Finished", "replay_of", "stderr", "stdout",
    "elapsed"}) as the CLI records them: NNN_tag.cmd.py, .stdout and .stderr files and a step log.
    Yields (project, session)."""
    with tempfile.TemporaryDirectory() as directory:
        project = dbx_repl.Project(directory)
        project.ensure_outputs_dir()
        entries = []
        for number, spec in enumerate(steps, 1):
            files = dbx_repl.StepFiles(project, number, spec["tag"])
            for path, text in ((files.command, spec["code"]), (files.stdout, spec.get("stdout", "")),
                               (files.stderr, spec.get("stderr", ""))):
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
            active = {"step": number, "tag": spec["tag"], "started_at": dbx_repl.now_iso()}
            entry = dbx_repl.step_entry(project, active, spec.get("status", "Finished"), elapsed=spec.get("elapsed"))
            if spec.get("replay_of"):
                entry["replay_of"] = spec["replay_of"]
            entries.append(entry)
        session = {"format": dbx_repl.SESSION_FORMAT, "status": "active", "session_name": "study",
                   "cluster_id": "0123-abc", "context_id": "ctx", "step_counter": len(steps), "steps": entries,
                   "active_command": None}
        yield project, session


def failure_at(step, tag, line):
    """The stderr of a step that raised at `line` of its own code, as the driver's traceback shows it."""
    return ('Traceback (most recent call last):\n'
            f'  File "<command-{dbx_repl.step_key(step, tag)}>", line {line}, in <module>\n'
            'ValueError: bad row\n')


def run_steps(codes):
    """Run Python step codes one after another in one namespace, as a context would: the namespace."""
    namespace = {}
    for code in codes:
        exec(compile(code, "<step>", "exec"), namespace)
    for name in ("__builtins__", "__doc__"):
        namespace.pop(name, None)
    return namespace


# -- generated sessions: straight-line steps over a few names ----------------------------------------

NAMES = ("a", "b", "c", "d", "e")
TAGS = ("load", "clean", "features", "train", "plot")


@st.composite
def programs(draw, min_steps=2, max_steps=7, bound=()):
    """Steps of assignments (and appends to a list `rows`) that read only names bound before them
    (in `bound` or by an earlier line). Returns [{"code", "tag", "reads", "binds"}]: the names a step
    reads before it binds them, and the names it binds or changes."""
    bound, steps = set(bound), []
    for _ in range(draw(st.integers(min_steps, max_steps))):
        lines, binds, reads = [], set(), set()
        for _ in range(draw(st.integers(1, 3))):
            known = sorted((bound | binds) - {"rows"})
            operands = draw(st.lists(st.sampled_from(known), max_size=2, unique=True)) if known else []
            expression = " + ".join(operands + [str(draw(st.integers(0, 9)))])
            kind = draw(st.sampled_from(["assign", "assign", "append" if "rows" in bound | binds else "new_rows"]))
            if kind == "append":
                lines.append(f"rows.append({expression})")
                operands, target = operands + ["rows"], "rows"
            elif kind == "new_rows":
                lines.append(f"rows = [{expression}]")
                target = "rows"
            else:
                target = draw(st.sampled_from(NAMES))
                lines.append(f"{target} = {expression}")
            reads |= set(operands) - binds
            binds.add(target)
        steps.append({"code": "\n".join(lines) + "\n", "tag": draw(st.sampled_from(TAGS)), "reads": reads,
                      "binds": binds})
        bound |= binds
    return steps


# -- what a step defines and uses ----------------------------------------------------------------------

@pytest.mark.parametrize("story, code, defines, uses", [
    ("assignments and imports define names; reads of earlier names are uses",
     "import pandas as pd\nfrom os import path\ndf = pd.read_csv(src)\nn = len(df)", {"pd", "path", "df", "n"},
     {"src"}),
    ("a name bound before it is read in the same step is not a use", "x = 1\ny = x + 1", {"x", "y"}, set()),
    ("x += 1 reads x first", "x += 1", {"x"}, {"x"}),
    ("a function's locals stay inside it; its free names are uses",
     "def f(a, *args, k=default, **kw):\n    t = a + offset\n    return t", {"f"}, {"default", "offset"}),
    ("a global statement makes a function's binding a definition",
     "def init():\n    global model\n    model = build()", {"init", "model"}, {"build"}),
    ("a class defines its name; its body's names are its own", "class Box(Base):\n    size = 3\n    y = size",
     {"Box"}, {"Base"}),
    ("comprehension and lambda variables are neither defined nor used",
     "squares = [i * i for i in items]\nf = lambda v: v + shift", {"squares", "f"}, {"items", "shift"}),
    ("a method call as a statement changes its object", "df.dropna(inplace=True)\nmodel.fit(X)",
     {"df", "model"}, {"df", "model", "X"}),
    ("a read-only method call changes nothing", "df.show()\nprint(model.get('k'))", set(), {"df", "model"}),
    ("item and attribute assignment change the object", "cfg['k'] = 1\nobj.attr = 2", {"cfg", "obj"},
     {"cfg", "obj"}),
    ("builtins and the runtime's names are never uses", "print(len(spark.range(3).collect()), dbutils, display)",
     set(), set()),
    ("a def nested in a block at module level is still defined", "if flag:\n    def g():\n        return h\n",
     {"g"}, {"flag", "h"}),
    ("spark.sql with a literal reads as SQL: views defined, tables used",
     "recent = spark.sql('CREATE OR REPLACE TEMP VIEW recent AS SELECT * FROM sales JOIN `Shop`.stores')",
     {"recent", "sql:recent"}, {"sql:sales", "sql:shop.stores"}),
    ("a call on the runtime's spark changes no name of the user's", "spark.sql('SET x = 1')", set(), set()),
    ("IF NOT EXISTS is no table's name", "spark.sql('CREATE TABLE IF NOT EXISTS totals AS SELECT * FROM raw')",
     {"sql:totals"}, {"sql:raw"}),
    ("a temp view made from Python defines it; spark.table uses one",
     "df.createOrReplaceTempView('v')\nt = spark.table('other')", {"df", "sql:v", "t"}, {"df", "sql:other"}),
])
def test_a_step_defines_what_it_binds_and_uses_what_it_reads_first(story, code, defines, uses):
    found = dbx_repl.analyse_code(code)
    assert found["parsed"] and found["defines"] == defines and found["uses"] == uses


@settings(max_examples=100, deadline=None)
@given(programs(min_steps=1, max_steps=1, bound=NAMES + ("rows",)), st.sampled_from(["", "%pip install x\n"]))
def test_the_uses_of_generated_code_are_exactly_the_names_it_reads_before_binding_them(program, opening):
    step = program[0]
    found = dbx_repl.analyse_code(opening + step["code"])
    assert found["parsed"] and found["uses"] == step["reads"] and found["defines"] == step["binds"]
    first_lines = [s[0] for s in found["statements"]]
    assert first_lines == list(range(opening.count("\n") + 1, opening.count("\n") + step["code"].count("\n") + 1))


def test_magic_lines_are_flagged_and_keep_the_line_numbers_of_the_python_around_them():
    found = dbx_repl.analyse_code("%pip install pandas==2.1\n!ls /dbfs\nx = 1\n%sh echo hi\ny = x")
    assert found["flags"] == {"pip", "magic"} and found["defines"] == {"x", "y"}
    assert [(first, last) for first, last, _ in found["statements"]] == [(3, 3), (5, 5)]


@pytest.mark.parametrize("code, flags", [
    ("import time\ntime.sleep(5)", {"sleep"}),
    ("answers = sub_llm_batch(prompts)", {"sub_llm"}),
    ("df.to_csv('/dbfs/out.csv')", {"writes"}),
    ("df.write.mode('overwrite').parquet(p)", {"writes"}),
    ("dbutils.fs.rm('/tmp/x', True)", {"writes"}),
    ("open('/tmp/x', 'w').write('y')", {"writes"}),
    ("with open(p, mode='a') as f:\n    f.write('y')", {"writes"}),
    ("text = open(p).read()", set()),
    ("spark.sql('INSERT INTO t VALUES (1)')", {"writes"}),
    ("spark.sql('SELECT * FROM t').show()", set()),
])
def test_costly_and_side_effect_calls_are_flagged(code, flags):
    assert dbx_repl.analyse_code(code)["flags"] == flags


def test_code_that_does_not_parse_has_no_names():
    found = dbx_repl.analyse_code("x = (1,\nprint(x)")
    assert not found["parsed"] and found["defines"] == set() == found["uses"]


def test_a_sql_step_is_read_as_sql():
    code = dbx_repl.sql_step_code("CREATE TABLE main.s.totals AS SELECT * FROM raw")
    found = dbx_repl.analyse_code(code)
    assert found["defines"] == {"sql:main.s.totals"} and found["uses"] == {"sql:raw"} and found["flags"] == {"writes"}
    assert dbx_repl.analyse_sql("SELECT * FROM totals")["flags"] == set()


# -- the replay plan -------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(programs())
def test_replaying_the_plan_gives_the_evicted_step_every_value_it_read(program):
    *done, last = program
    steps = done + [dict(last, status="Evicted")]
    with recorded(steps) as (project, session):
        plan, target = dbx_repl.dependency_plan(project, session)
    assert target == session["steps"][-1]
    origins = [e["origin"] for e in plan]
    assert origins == sorted(set(origins)) and all(o < len(steps) for o in origins)
    replayed = run_steps([dbx_repl.replay_code(e) for e in plan])
    original = run_steps([s["code"] for s in done])
    for name in last["reads"]:
        assert replayed[name] == original[name], (name, origins)
    for index, entry in enumerate(plan):                        # no step is replayed for nothing
        later_uses = set(last["reads"]).union(*(e["uses"] for e in plan[index + 1:]))
        assert entry["defines"] & later_uses, (entry["origin"], origins)


@settings(max_examples=50, deadline=None)
@given(programs())
def test_without_a_target_the_plan_restores_every_name_the_session_defined(program):
    with recorded(program) as (project, session):
        plan, target = dbx_repl.dependency_plan(project, session)
    assert target is None
    assert run_steps([dbx_repl.replay_code(e) for e in plan]) == run_steps([s["code"] for s in program])


def test_a_failed_step_that_defined_names_is_planned_up_to_its_failing_line():
    steps = [{"tag": "load", "code": "raw = [1, 2, 3]\n"},
             {"tag": "clean", "code": "clean = [r * 2 for r in raw]\nbad = clean[10]\nnever = 1\n",
              "status": "Error", "stderr": failure_at(2, "clean", 2)},
             {"tag": "train", "code": "model = sum(clean)\n", "status": "Evicted"}]
    with recorded(steps) as (project, session):
        plan, target = dbx_repl.dependency_plan(project, session)
        rows = dbx_repl.plan_rows(project, plan)
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["runs_lines"] == "1-1"
    assert dbx_repl.replay_code(plan[1]) == "clean = [r * 2 for r in raw]\n"
    assert run_steps([dbx_repl.replay_code(e) for e in plan])["clean"] == [2, 4, 6]


def test_a_finished_replay_stands_in_for_the_failed_step_it_replayed():
    steps = [{"tag": "load", "code": "x = 1\n"},
             {"tag": "fit", "code": "y = x / 0\n", "status": "Error", "stderr": failure_at(2, "fit", 1)},
             {"tag": "fit", "code": "y = x / 1\n", "replay_of": 2},
             {"tag": "report", "code": "z = y\n", "status": "Evicted"}]
    with recorded(steps) as (project, session):
        timeline = dbx_repl.step_timeline(project, session)
        plan, _ = dbx_repl.dependency_plan(project, session)
    assert [(e["origin"], e["step"], e["status"]) for e in timeline] == [(1, 1, "Finished"), (2, 3, "Finished"),
                                                                          (4, 4, "Evicted")]
    assert [e["origin"] for e in plan] == [1, 2] and plan[1]["code"] == "y = x / 1\n"


def test_steps_whose_needs_are_unknown_are_always_replayed_and_costly_steps_are_flagged():
    steps = [{"tag": "deps", "code": "%pip install rich\n"},
             {"tag": "odd", "code": "x = (\n"},
             {"tag": "wait", "code": "import time\ntime.sleep(120)\nw = 1\n", "elapsed": 121.0},
             {"tag": "dump", "code": "v = 2\nprint('x' * 200000)\n", "stdout": "x" * 200_001},
             {"tag": "use", "code": "print(w + v)\n", "status": "Evicted"}]
    with recorded(steps) as (project, session):
        plan, target = dbx_repl.dependency_plan(project, session)
        summary = dbx_repl.plan_summary(project, plan, target)
        with open(project.output_path(dbx_repl.REPLAY_PLAN_FILE), encoding="utf-8") as f:
            written = json.load(f)
    assert [e["origin"] for e in plan] == [1, 2, 3, 4]
    assert summary["steps"] == "1-4" and summary["count"] == 4
    assert summary["flagged"] == {"1": ["pip"], "3": ["sleep", "slow"], "4": ["big_output"]}
    assert written["for_step"] == "005_use" and [s["step"] for s in written["steps"]] == [1, 2, 3, 4]
    assert len(json.dumps(summary)) < 400


@given(st.sets(st.integers(0, 400), max_size=60))
def test_a_step_list_written_as_ranges_reads_back_as_the_same_steps(numbers):
    written = dbx_repl._step_ranges(numbers)
    assert dbx_repl.parse_step_list(written) == sorted(numbers) if numbers else written == ""
    assert len(written) <= len(",".join(map(str, sorted(numbers))))


@pytest.mark.parametrize("text", ["1;2", "a", "3-", "-2", "1,,2", "1.5"])
def test_a_step_list_that_is_not_numbers_or_ranges_is_refused(text):
    with pytest.raises(dbx_repl.ReplError) as refused:
        dbx_repl.parse_step_list(text)
    assert refused.value.status == "InvalidSteps" and refused.value.exit_code == dbx_repl.EXIT_USAGE


# -- the export script ---------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(programs(max_steps=8))
def test_an_export_runs_top_to_bottom_and_each_kept_step_sees_the_values_it_saw_in_the_session(program):
    with recorded(program) as (project, session):
        chosen, left_out = dbx_repl.export_selection(project, session)
    assert left_out == []
    origins = [e["origin"] for e in chosen]
    last_per_tag = {s["tag"]: number for number, s in enumerate(program, 1)}
    assert set(last_per_tag.values()) <= set(origins)            # the last run of each tag is there
    seen_in_session, namespace = {}, {}
    for number, step in enumerate(program, 1):
        seen_in_session[number] = {n: json.dumps(namespace[n]) for n in step["reads"]}
        exec(step["code"], namespace)
    namespace = {}
    for entry in chosen:
        step = program[entry["origin"] - 1]
        assert {n: json.dumps(namespace.get(n)) for n in step["reads"]} == seen_in_session[entry["origin"]]
        exec(step["code"], namespace)
    script, requires = dbx_repl.export_script(session, chosen)
    namespace.pop("__builtins__", None)
    assert run_steps([script]) == namespace and requires == []


def test_export_keeps_the_last_run_of_each_tag_and_the_steps_it_needs_and_leaves_exploration_out():
    steps = [{"tag": "load", "code": "raw = [3, 1, 2]\n"},
             {"tag": "peek", "code": "import time\ntime.sleep(1)\nprint(raw)\n"},
             {"tag": "sort", "code": "ordered = sorted(raw)\n"},
             {"tag": "load", "code": "raw = [9]\n"},
             {"tag": "fails", "code": "boom = 1 / 0\n", "status": "Error", "stderr": failure_at(5, "fails", 1)},
             {"tag": "wait", "code": "import time\ntime.sleep(1)\nlimit = 2\n"},
             {"tag": "top", "code": "best = ordered[:limit]\n"}]
    with recorded(steps) as (project, session):
        chosen, left_out = dbx_repl.export_selection(project, session)
        assert [e["origin"] for e in chosen] == [1, 3, 4, 6, 7]
        assert left_out == [{"step": 2, "tag": "peek", "why": "exploration: sleep"},
                            {"step": 5, "tag": "fails", "why": "status Error"}]     # never finished: named too
        chosen, left_out = dbx_repl.export_selection(project, session, exclude_tags=("top",))
        assert 7 not in [e["origin"] for e in chosen] and {"step": 7, "tag": "top", "why": "--exclude-tags"} in left_out
        chosen, left_out = dbx_repl.export_selection(project, session, steps=[5, 4, 1])
        assert [e["origin"] for e in chosen] == [1, 4]
        assert left_out == [{"step": 5, "tag": "fails", "why": "status Error"}]
        with pytest.raises(dbx_repl.ReplError) as unknown:
            dbx_repl.export_selection(project, session, steps=[99])
        assert unknown.value.status == "UnknownStep"


def test_the_script_gathers_imports_turns_pip_into_requirements_and_magics_into_comments():
    steps = [{"tag": "deps", "code": "%pip install pandas==2.1 -q rich\n"},
             {"tag": "load", "code": "import json\nimport os, sys\nx = json.dumps([1])\n"},
             {"tag": "look", "code": "import json\n%sh ls /tmp\ny = x; import re\n"},
             {"tag": "query", "code": dbx_repl.sql_step_code("SELECT 1 AS one")},
             {"tag": "ask", "code": "answer = sub_llm('hi')\n"}]
    with recorded(steps) as (project, session):
        chosen, _ = dbx_repl.export_selection(project, session, steps=[1, 2, 3, 4, 5])
    script, requires = dbx_repl.export_script(session, chosen)
    assert requires == ["pandas==2.1", "rich"] and script.startswith("# Requires: pandas==2.1 rich\n")
    ast.parse(script)
    top_level_imports = [line for line in script.splitlines() if line.startswith(("import ", "from "))]
    assert top_level_imports == ["import json", "import os, sys"]             # once each, before the steps
    assert script.index("import os, sys") < script.index("# --- Step 1: deps ---")
    assert "# (magic, not run as Python) %sh ls /tmp" in script and "y = x; import re" in script
    assert "display(spark.sql('SELECT 1 AS one'))" in script
    assert "Needs the Databricks runtime for spark, display" in script and "helpers sub_llm:" in script
    assert "'study'" in script and "0123-abc" in script


def test_a_failed_steps_statements_before_its_failure_are_exported_with_a_note():
    steps = [{"tag": "load", "code": "a = 1\nb = a / 0\n", "status": "Error", "stderr": failure_at(1, "load", 2)},
             {"tag": "use", "code": "c = a + 1\n"}]
    with recorded(steps) as (project, session):
        chosen, left_out = dbx_repl.export_selection(project, session)
    script, _ = dbx_repl.export_script(session, chosen)
    assert left_out == [] and "(lines 1-1: the statements that ran before it failed)" in script
    assert "a / 0" not in script and run_steps([script]) == {"a": 1, "c": 2}


def entries(uses_and_defines):
    return [{"origin": n, "uses": set(u), "defines": set(d)} for n, (u, d) in enumerate(uses_and_defines, 1)]


@given(st.lists(st.tuples(st.sets(st.sampled_from(NAMES), max_size=2), st.sets(st.sampled_from(NAMES), max_size=2)),
                max_size=8))
def test_dependency_order_keeps_every_step_once_and_the_session_order_when_nothing_is_used_early(specs):
    chosen = entries(specs)
    ordered = dbx_repl.dependency_order(list(reversed(chosen)))
    assert sorted(e["origin"] for e in ordered) == [e["origin"] for e in chosen]
    used_before_defined = any(
        name not in set().union(*(d["defines"] for d in chosen[:e["origin"] - 1]))
        and any(name in d["defines"] for d in chosen[e["origin"]:]) for e in chosen for name in e["uses"])
    if not used_before_defined:
        assert ordered == chosen


def test_a_step_that_uses_a_name_only_a_later_step_defines_moves_after_it():
    chosen = entries([({"y"}, {"x"}), (set(), {"z"}), (set(), {"y"})])
    assert [e["origin"] for e in dbx_repl.dependency_order(chosen)] == [2, 3, 1]
    cycle = entries([({"y"}, {"x"}), ({"x"}, {"y"})])
    assert [e["origin"] for e in dbx_repl.dependency_order(cycle)] == [1, 2]
