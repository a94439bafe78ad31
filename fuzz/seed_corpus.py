#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets into fuzz/corpus/<target>/.

Seeds are named `seed-<what>` so that they are easy to tell from what the fuzzer
found. scripts/fuzz.sh minimizes each corpus after a run (`cargo fuzz cmin`, which
keeps only inputs that add coverage, under the SHA-1 of their content as name) and then
runs this again: the seeds stay, readable, and their hash-named copies are dropped.

Tokens are HS256 JWTs minted with the secret the targets use
(`localup_fuzz::SECRET` in fuzz/src/lib.rs). None of them expires before 2100, so
the seeds mean the same thing whenever they are run.

Standard library only: `python3 fuzz/seed_corpus.py [TARGET...]` (all targets by default).
"""

import base64
import hashlib
import hmac
import json
import os
import random
import struct
import sys

SECRET = b"localup-fuzz-secret"
HERE = os.path.dirname(os.path.abspath(__file__))
MAX_FRAME_LEN = 16 * 1024
NOW = 1_750_000_000  # iat of the seed tokens (June 2025)
YEAR_2100 = 4_102_444_800


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims, secret=SECRET, alg="HS256", header=None):
    header = header if header is not None else {"typ": "JWT", "alg": alg}
    signed = (
        b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64(json.dumps(claims, separators=(",", ":")).encode())
    )
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    if alg == "none":
        return signed + "."
    signature = hmac.new(secret, signed.encode(), digest[alg]).digest()
    return signed + "." + b64(signature)


def frame(body):
    if isinstance(body, (dict, list)):
        body = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    if isinstance(body, str):
        body = body.encode()
    return struct.pack(">I", len(body)) + body


def hello(token, **fields):
    return frame({"token": token, **fields})


def claims(sub="mydb", **extra):
    return {"sub": sub, "iat": NOW, **extra}


def edge_cases():
    """Framing and JSON edge cases, for every target that reads raw frames."""
    deep = "[" * 200 + "]" * 200
    deep_object = '{"a":' * 200 + "1" + "}" * 200
    return {
        "empty": b"",
        "one-byte": b"\x00",
        "three-bytes": b"\x00\x00\x00",
        "length-only-zero": struct.pack(">I", 0),
        "length-only-five": struct.pack(">I", 5),
        "length-at-cap-no-body": struct.pack(">I", MAX_FRAME_LEN),
        "length-above-cap": struct.pack(">I", MAX_FRAME_LEN + 1),
        "length-max": b"\xff\xff\xff\xff",
        "length-above-cap-with-body": struct.pack(">I", MAX_FRAME_LEN + 1) + b'{"token":"t"}',
        "truncated-json": frame('{"token":"eyJhbGciOiJIUzI1NiJ9.e30.x","remote_p'),
        "truncated-frame": frame('{"token":"t","remote_port":1}')[:-5],
        "deeply-nested-array": frame(deep),
        "deeply-nested-object": frame(deep_object),
        "deeply-nested-token": frame('{"token":' + deep + "}"),
        "unicode-escapes": frame('{"token":"\\u00e9\\ud83d\\ude00\\u0000\\n","remote_port":1}'),
        "unicode-raw": frame('{"token":"ünïcødé 😀 \u2028","remote_port":1}'),
        "lone-surrogate": frame('{"token":"\\ud800","remote_port":1}'),
        "invalid-utf8": frame(b'{"token":"\xff\xfe","remote_port":1}'),
        "bom": frame(b'\xef\xbb\xbf{"token":"t"}'),
        "whitespace": frame(' \n\t{ "token" : "t" , "remote_port" : 1 } \r\n'),
        "not-json": frame("not json"),
        "json-array": frame("[]"),
        "json-null": frame("null"),
        "json-number": frame("1e999"),
        "duplicate-keys": frame('{"token":"a","token":"b"}'),
        "port-too-large": frame('{"token":"t","remote_port":70000}'),
        "port-negative": frame('{"token":"t","remote_port":-1}'),
        "port-float": frame('{"token":"t","remote_port":1.0}'),
        "port-string": frame('{"token":"t","remote_port":"1"}'),
        "token-number": frame('{"token":5}'),
        "missing-token": frame('{"remote_port":1}'),
        "unknown-fields": frame('{"token":"t","remote_port":null,"something_new":{"x":[1,2]}}'),
        "trailing-garbage": frame('{"token":"t"}') + b"\x00garbage",
        "trailing-comma": frame('{"token":"t",}'),
    }


def messages():
    """One frame of every control message (and token claims), as encoded on the wire."""
    bodies = {
        "hello": {"token": "t", "remote_port": 16432},
        "hello-no-port": {"token": "t", "remote_port": None},
        "hello-reply-accepted": {"result": "accepted", "port": 16432, "public_addr": "relay.example.com:16432"},
        "hello-reply-accepted-full": {
            "result": "accepted",
            "port": 1,
            "public_addr": "[::1]:1",
            "expires_at": YEAR_2100,
            "proxy_protocol": "v2",
        },
        "stream-header-v4": {"peer": "203.0.113.7:51234"},
        "stream-header-v6": {"peer": "[2001:db8::1]:443", "local": "[::ffff:10.0.0.1]:16432"},
        "stream-header-v6-scope": {"peer": "[fe80::1%3]:22", "local": "0.0.0.0:0"},
        "stream-reply-connected": {"result": "connected"},
        "stream-reply-unreachable": {"result": "unreachable", "reason": "connection refused"},
        "client-renew": {"type": "renew", "token": "t"},
        "client-pong": {"type": "pong", "id": 18446744073709551615},
        "relay-renewed": {"type": "renewed", "expires_at": YEAR_2100},
        "relay-renewed-no-expiry": {"type": "renewed", "expires_at": None},
        "relay-renewed-implicit": {"type": "renewed"},
        "relay-renew-refused": {"type": "renew_refused", "message": "Authentication failed"},
        "relay-ping": {"type": "ping", "id": 0},
        "unknown-type": {"type": "launch"},
        "claims-full": {
            **claims(exp=YEAR_2100, nbf=NOW, ports="10000-20000", pool=True, port_epoch=1),
            "proxy_protocol": "v1",
            "allow_from": ["10.0.0.0/8", "::1/128", "192.168.1.7/32"],
            "max_connections": 5,
            "bandwidth_in": 1000000,
            "bandwidth_out": 0,
        },
    }
    for reason in [
        "authentication_failed", "port_out_of_range", "port_not_allowed", "port_in_use",
        "no_free_port", "malformed", "too_many_tunnels", "busy", "superseded",
    ]:
        bodies[f"hello-reply-refused-{reason}"] = {"result": "refused", "reason": reason, "message": "m"}
    for reason in ["token_expired", "replaced", "superseded", "shutdown"]:
        bodies[f"relay-closing-{reason}"] = {"type": "closing", "reason": reason, "message": "m"}
    seeds = {name: frame(body) for name, body in bodies.items()}
    seeds["two-frames"] = frame(bodies["relay-ping"]) + frame(bodies["relay-closing-shutdown"])
    seeds["frame-then-partial"] = frame(bodies["client-pong"]) + frame(bodies["client-renew"])[:7]
    return seeds


def hellos():
    """Hellos with real tokens: each claim, each way a token goes wrong."""
    long_sub = "x" * 257
    return {
        "valid": hello(jwt(claims())),
        "valid-port": hello(jwt(claims()), remote_port=16432),
        "valid-port-null": hello(jwt(claims()), remote_port=None),
        "valid-port-max": hello(jwt(claims()), remote_port=65535),
        "port-zero": hello(jwt(claims()), remote_port=0),
        "exp-future": hello(jwt(claims(exp=YEAR_2100))),
        "expired": hello(jwt(claims(exp=1000))),
        "nbf-future": hello(jwt(claims(nbf=YEAR_2100))),
        "nbf-past": hello(jwt(claims(nbf=NOW))),
        "ports-single": hello(jwt(claims(ports="16432")), remote_port=16432),
        "ports-range": hello(jwt(claims(ports="10000-20000")), remote_port=15000),
        "ports-invalid": hello(jwt(claims(ports="20000-10000"))),
        "ports-zero": hello(jwt(claims(ports="0"))),
        "ports-number": hello(jwt(claims(ports=16432))),
        "pool": hello(jwt(claims(pool=True, port_epoch=1_750_000_000_000))),
        "pool-not-bool": hello(jwt(claims(pool="yes"))),
        "epoch-negative": hello(jwt(claims(port_epoch=-1))),
        "policy": hello(
            jwt(claims(
                proxy_protocol="v2",
                allow_from=["10.0.0.0/8", "2001:db8::/32", "::ffff:10.0.0.0/104"],
                max_connections=4294967295,
                bandwidth_in=1,
                bandwidth_out=18446744073709551615,
            )),
            remote_port=16432,
        ),
        "policy-bad-cidr": hello(jwt(claims(allow_from=["10.0.0.0/33", "not-an-ip"]))),
        "policy-bad-proxy": hello(jwt(claims(proxy_protocol="v3"))),
        "policy-max-connections-overflow": hello(jwt(claims(max_connections=4294967296))),
        "sub-empty": hello(jwt(claims(sub=""))),
        "sub-256": hello(jwt(claims(sub="x" * 256))),
        "sub-257": hello(jwt(claims(sub=long_sub))),
        "sub-unicode": hello(jwt(claims(sub="dé😀"))),
        "sub-missing": hello(jwt({"iat": NOW})),
        "iat-missing": hello(jwt({"sub": "mydb"})),
        "exp-string": hello(jwt(claims(exp="soon"))),
        "extra-claims": hello(jwt(claims(iss="someone", aud=["x"], custom={"a": 1}))),
        "claims-array": hello(jwt([1, 2, 3])),
        "wrong-secret": hello(jwt(claims(), secret=b"other-secret")),
        "hs384": hello(jwt(claims(), alg="HS384")),
        "hs512": hello(jwt(claims(), alg="HS512")),
        "alg-none": hello(jwt(claims(), alg="none")),
        "header-extra": hello(jwt(claims(), header={"alg": "HS256", "kid": "k", "typ": "JWT"})),
        "header-no-typ": hello(jwt(claims(), header={"alg": "HS256"})),
        "header-rs256": hello(jwt(claims(), header={"alg": "RS256"})),
        "token-three-dots": hello("a.b.c"),
        "token-four-parts": hello(jwt(claims()) + ".x"),
        "token-empty": hello(""),
        "token-padded": hello(jwt(claims()) + "="),
        "not-a-jwt": hello("not-a-jwt", remote_port=1),
    }


def random_seeds(count, seed):
    rng = random.Random(seed)
    return {f"random-{i}": bytes(rng.randrange(256) for _ in range(rng.choice([8, 64, 256, 1024])))
            for i in range(count)}


def write(target, seeds):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(directory, f"seed-{name}"), "wb") as f:
            f.write(data)
        twin = os.path.join(directory, hashlib.sha1(data).hexdigest())
        if os.path.exists(twin):
            os.remove(twin)
    print(f"{target}: {len(seeds)} seeds in {os.path.relpath(directory)}")


def main():
    edges = edge_cases()
    seeds = {
        "control_frame": {**edges, **messages()},
        "relay_hello": {**edges, **hellos(), "hello-message": messages()["hello"]},
        # Interpreted by `arbitrary`, so any bytes do; the fuzzer shapes them from there.
        "relay_hello_structured": random_seeds(8, 1),
    }
    targets = sys.argv[1:] or list(seeds)
    for target in targets:
        if target not in seeds:
            sys.exit(f"unknown target {target}; one of {', '.join(seeds)}")
        write(target, seeds[target])


if __name__ == "__main__":
    main()
