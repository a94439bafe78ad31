"""Logs go to stdout: plain text by default, JSON lines with --log-format json."""

import json

from conftest import start_relay


def test_relay_logs_plain_text_on_stdout_by_default(run_container, tmp_path):
    relay = start_relay(run_container, tmp_path)
    out, err = relay.container.logs()
    assert "relay listening" in out, (out, err)
    assert "relay listening" not in err
    line = next(line for line in out.splitlines() if "relay listening" in line)
    assert "INFO" in line
    assert not line.lstrip().startswith("{"), line
    # No colour codes when stdout is not a terminal (log collectors store them raw).
    assert "\x1b[" not in out


def json_lines(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "no output"
    return [json.loads(line) for line in lines]


def test_relay_logs_json_lines_with_the_flag(run_container, tmp_path):
    relay = start_relay(run_container, tmp_path, "relay", "tcp", "--log-format", "json")
    out, _ = relay.container.logs()
    records = json_lines(out)  # every line of stdout is a JSON object
    listening = [r for r in records if "relay listening" in r.get("fields", {}).get("message", "")]
    assert listening, records
    assert listening[0]["level"] == "INFO"
    assert listening[0]["fields"]["addr"] == relay.addr
    assert "timestamp" in listening[0]


def test_relay_logs_json_lines_with_the_environment(run_container, tmp_path):
    relay = start_relay(run_container, tmp_path, env={"LOCALUP_LOG_FORMAT": "json"})
    records = json_lines(relay.container.logs()[0])
    assert any("relay listening" in r.get("fields", {}).get("message", "") for r in records)
