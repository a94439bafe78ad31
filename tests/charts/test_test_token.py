"""The helm test's token, minted by the chart in the template language (HS256 by hand:
Helm has no HMAC function): it must be exactly what the relay accepts."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil

import pytest

from chart_helpers import RELAY, find, helm, render, secret_data

FULL = "localup-relay"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hs256(key: bytes, message: bytes) -> str:
    return b64url(hmac.new(key, message, hashlib.sha256).digest())


@pytest.mark.parametrize("release", ["localup-relay", "edge"])
def test_rendered_token_is_signed_with_the_rendered_jwt_secret(release):
    objects = render(release=release)
    fullname = "localup-relay" if release == "localup-relay" else f"{release}-localup-relay"
    secret = secret_data(find(objects, "Secret", f"{fullname}-jwt"), "jwt-secret")
    token = secret_data(find(objects, "Secret", f"{fullname}-test-token"), "token")
    header, payload, signature = token.split(".")
    assert hs256(secret.encode(), f"{header}.{payload}".encode()) == signature, (
        "the test token's signature does not match the JWT Secret rendered beside it")
    assert json.loads(b64url_decode(header)) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(b64url_decode(payload)) == {
        "sub": f"helm-test/{release}",
        "iat": 0,
        "pool": True,
        "port_epoch": 1,
        "allow_from": ["0.0.0.0/32"],
    }


@pytest.fixture(scope="module")
def hs256_chart(tmp_path_factory):
    """A scratch chart around the relay chart's helpers, rendering HS256 of given inputs."""
    chart = tmp_path_factory.mktemp("hs256")
    (chart / "templates").mkdir()
    shutil.copy(RELAY / "templates/_helpers.tpl", chart / "templates/_helpers.tpl")
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: hs256\nversion: 0.0.1\n")
    (chart / "templates/cases.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cases}\ndata:\n"
        "{{- range $i, $c := .Values.cases }}\n"
        '  c{{ $i }}: {{ include "localup-relay.hs256" (dict "key" $c.key "msg" $c.msg) | quote }}\n'
        "{{- end }}\n")
    return chart


KEYS = ["", "k", "my-jwt-secret", "x" * 48, "y" * 63, "z" * 64, "w" * 65, "v" * 200,
        "clé-ü-€", "~!@#$%^&*() \"quoted\""]
MESSAGES = ["", "a.b", "eyJhbGciOiJIUzI1NiJ9." + "p" * 500]


def test_template_hs256_matches_hmac_sha256(hs256_chart):
    cases = [{"key": k, "msg": m} for k in KEYS for m in MESSAGES]
    values = hs256_chart / "values.json"
    values.write_text(json.dumps({"cases": cases}))
    import yaml
    out = yaml.safe_load(helm("template", "t", str(hs256_chart), "-f", str(values)).stdout)
    for i, case in enumerate(cases):
        expected = hs256(case["key"].encode(), case["msg"].encode())
        assert out["data"][f"c{i}"] == expected, case
