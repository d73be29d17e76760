"""Beyond a plain REPL: starting a stopped cluster with consent, SQL steps, local modules synced to
the driver, and watching a running step. Every test drives the CLI as a subprocess on the local
workspace."""

import os

from local_workspace import TERMINATED_CLUSTER_ID


def _starts(workspace):
    return [r for r in workspace.requests() if r["path"] == "/api/2.1/clusters/start"]


# -- starting a stopped cluster, only with consent ---------------------------------------------------

def test_create_without_consent_refuses_a_terminated_cluster_and_starts_nothing(repl, workspace):
    refused = repl.create(TERMINATED_CLUSTER_ID)
    assert refused.status == "ClusterNotRunning" and refused.code == 1, refused
    assert refused["cluster_state"] == "TERMINATED"
    assert "--start-cluster" in refused["hint"]
    assert _starts(workspace) == []
    assert repl.run("find-cluster", "--name", "analytics-prod", project=False)["state"] == "TERMINATED"


def test_create_with_start_cluster_starts_a_terminated_cluster_and_opens_the_session(repl, workspace):
    workspace.configure(start_delay=2.0)
    created = repl.create(TERMINATED_CLUSTER_ID, "started", "--start-cluster", "--timeout", "60")
    assert created.status == "Created", created
    assert len(_starts(workspace)) == 1
    assert repl.exec("print(6 * 7)", "answer")["stdout_preview"].strip() == "42"
    repl.run("destroy")


def test_a_cluster_still_starting_at_the_deadline_answers_cluster_starting_with_the_same_create(repl, workspace):
    workspace.configure(start_delay=30.0)
    starting = repl.create(TERMINATED_CLUSTER_ID, "slow", "--start-cluster", "--timeout", "3")
    assert starting.status == "ClusterStarting" and starting.code == 3, starting
    assert starting["cluster_state"] == "PENDING"
    again = starting["tip"]["create"]
    assert "--start-cluster" in again and "--timeout 3" in again and "--session-name slow" in again
    assert not os.path.exists(os.path.join(repl.project_dir, "session.json"))
    # Called again, it waits for the same start instead of starting twice.
    workspace.configure(start_delay=30.0)
    still = repl.create(TERMINATED_CLUSTER_ID, "slow", "--start-cluster", "--timeout", "1")
    assert still.status == "ClusterStarting", still
    assert len(_starts(workspace)) == 1


def test_find_cluster_says_which_clusters_can_be_started_and_why_they_are_off(repl):
    found = repl.run("find-cluster", "--name", "analytics-prod", project=False)
    assert found.status == "Found", found
    assert found["startable"] is True and found["state"] == "TERMINATED"
    assert "inactive" in found["state_message"].lower()
    assert "--start-cluster" in found["hint"]
    running = repl.run("find-cluster", "--name", "analytics-dev", project=False)
    assert running["startable"] is False
