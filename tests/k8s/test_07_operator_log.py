"""At the end of the session (see `session_end` in conftest.py): over the whole session
the operator (under the chart's ServiceAccount) never hit a permission it lacks and
never panicked. The test first gives it work of its own, so the log it reads is known
to hold reconciles, token writes and Service updates even when it runs alone."""
from __future__ import annotations

import re

import pytest


@pytest.mark.session_end(1)
def test_operator_log_has_no_permission_errors_or_panics(operator_session, op, lb, ns, tunnels):
    tunnels.create(ns, "logged", labels={"app": "logged"})
    tunnels.wait_port(ns, "logged")
    log = operator_session.process.all_output()
    # Positive control: the log is the operator's, and it did the work that needs its
    # permissions (relay Service patch, token Secret apply, status).
    for done in ("relay Service ports updated", "token Secret written"):
        assert done in log, f"the operator's log lacks {done!r}: is it captured?\n{log[-2000:]}"
    # Events about pods of a namespace being deleted are refused whatever the
    # permissions (NamespaceTerminating): not a missing permission.
    bad = [line for line in log.splitlines()
           if re.search(r"forbidden|\b403\b|panicked|Unauthorized", line, re.IGNORECASE)
           and "NamespaceTerminating" not in line]
    assert not bad, "the operator's log over the session:\n" + "\n".join(bad[:20])
