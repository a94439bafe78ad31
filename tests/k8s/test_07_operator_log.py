"""Runs last: over the whole session, the operator (under the chart's ServiceAccount)
never hit a permission it lacks, and never panicked."""
from __future__ import annotations

import re


def test_operator_log_has_no_permission_errors_or_panics(operator_session):
    log = operator_session.process.all_output()
    assert log, "no operator output captured"
    bad = [line for line in log.splitlines()
           if re.search(r"forbidden|\b403\b|panicked|Unauthorized", line, re.IGNORECASE)]
    assert not bad, "the operator's log over the session:\n" + "\n".join(bad[:20])
