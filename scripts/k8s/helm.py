#!/usr/bin/env python3
"""A tiny helm CLI on top of helm_sdkpy (the Helm 4 Go library behind a Python API).

No helm binary is available on these machines; run this with the venv python that
scripts/k8s/helm-venv.sh prints:

    PY=$(scripts/k8s/helm-venv.sh)
    $PY scripts/k8s/helm.py lint CHART [--strict] [-v]
    $PY scripts/k8s/helm.py install RELEASE CHART -n NS [--values FILE]... [--set-json JSON]...
                                   [--set K=V]... [--wait] [--timeout SECS] [--create-namespace]
    $PY scripts/k8s/helm.py upgrade RELEASE CHART -n NS [--install] [same value/wait options]
    $PY scripts/k8s/helm.py uninstall RELEASE -n NS [--wait] [--ignore-not-found]
    $PY scripts/k8s/helm.py status RELEASE -n NS
    $PY scripts/k8s/helm.py list -n NS
    $PY scripts/k8s/helm.py show-values CHART

The cluster is $KUBECONFIG unless --kubeconfig is given. Values are merged in order:
--values files, then --set-json, then --set (later wins, maps merge deeply).
--set-json takes either a JSON object ('{"a":{"b":1}}') or helm's KEY.PATH=JSONVALUE.
Release commands print the release as JSON: by default name, namespace, revision, status,
description and the user-supplied values (-o json: the whole release, -o manifest: the
rendered YAML).
On failure: the library's error text on stderr and exit status 1 (2 for usage errors).

`template` is not offered: helm_sdkpy has no template/dry-run action.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

try:
    import yaml

    import helm_sdkpy
except ImportError as _e:
    sys.exit(f"helm.py: error: {_e}; run it with the python that scripts/k8s/helm-venv.sh prints")

# helm's lint severities (pkg/chart/v2/lint/support): the library returns the numbers only.
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


class UsageError(Exception):
    pass


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def set_path(values: dict, dotted: str, value: Any) -> dict:
    """helm-style KEY.PATH=VALUE (no list indexes, no escaped dots)."""
    keys = dotted.split(".")
    if not all(keys):
        raise UsageError(f"bad key {dotted!r}")
    nested: Any = value
    for k in reversed(keys):
        nested = {k: nested}
    return deep_merge(values, nested)


def collect_values(args: argparse.Namespace) -> dict:
    values: dict = {}
    for path in args.values or []:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise UsageError(f"{path}: values file must hold a mapping")
        values = deep_merge(values, loaded)
    for item in args.set_json or []:
        try:
            obj = json.loads(item)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            values = deep_merge(values, obj)
            continue
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set-json wants a JSON object or KEY=JSON, got {item!r}")
        try:
            values = set_path(values, key, json.loads(raw))
        except json.JSONDecodeError as e:
            raise UsageError(f"--set-json {key}: invalid JSON: {e}") from e
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"--set wants KEY=VALUE, got {item!r}")
        # YAML scalar rules, close to helm's: 3 -> int, true -> bool, abc -> str.
        values = set_path(values, key, yaml.safe_load(raw) if raw else "")
    return values


def config(args: argparse.Namespace) -> helm_sdkpy.Configuration:
    # Not used as a context manager: its __exit__ and __del__ both destroy the handle.
    return helm_sdkpy.Configuration(
        namespace=args.namespace, kubeconfig=args.kubeconfig, kubecontext=args.kube_context
    )


def release_out(rel: Any, args: argparse.Namespace) -> str:
    """A release as JSON: by default the useful fields only (the full release also
    carries the whole chart, templates base64-encoded); -o json for all of it,
    -o manifest for the rendered YAML."""
    out = getattr(args, "output", "summary")
    if out == "manifest":
        return rel.get("manifest", "") if isinstance(rel, dict) else ""
    if out == "summary":
        brief = lambda r: {  # noqa: E731
            "name": r.get("name"),
            "namespace": r.get("namespace"),
            "revision": r.get("version"),
            "status": (r.get("info") or {}).get("status"),
            "description": (r.get("info") or {}).get("description"),
            "values": r.get("config"),
        } if isinstance(r, dict) and "info" in r else r
        if isinstance(rel, dict) and isinstance(rel.get("release"), dict):
            rel = rel["release"]  # uninstall answers {"release": {...}, "info": ...}
        rel = [brief(r) for r in rel] if isinstance(rel, list) else brief(rel)
    return json.dumps(rel, indent=2, sort_keys=True, default=str)


def cmd_lint(args: argparse.Namespace) -> int:
    res = asyncio.run(helm_sdkpy.Lint(config(args)).run(args.chart))
    # Lint problems do not raise: they come back as messages. The Go error values
    # serialise as {} so only severity and path survive, not the text.
    worst = 0
    for m in res.get("Messages") or []:
        sev = int(m.get("Severity", 0))
        worst = max(worst, sev)
        err = m.get("Err")
        text = f": {err}" if err not in (None, {}, "") else ""
        if sev >= 2 or args.verbose:  # INFO is e.g. "icon is recommended"
            print(f"[{SEVERITY.get(sev, sev)}] {m.get('Path', '')}{text}", file=sys.stderr)
    failed = bool(res.get("Errors")) or worst >= 3 or (args.strict and worst >= 2)
    n = res.get("TotalChartsLinted", 0)
    if failed:
        print(
            f"helm.py: error: lint failed for {args.chart} (charts linted: {n}); helm_sdkpy "
            "drops lint message texts: an install into a scratch namespace shows template "
            "errors in full",
            file=sys.stderr,
        )
        return 1
    print(f"{n} chart(s) linted, 0 chart(s) failed")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    rel = asyncio.run(
        helm_sdkpy.Install(config(args)).run(
            args.release,
            args.chart,
            values=collect_values(args),
            create_namespace=args.create_namespace,
            wait=args.wait,
            timeout=args.timeout,
        )
    )
    print(release_out(rel, args))
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    rel = asyncio.run(
        helm_sdkpy.Upgrade(config(args)).run(
            args.release,
            args.chart,
            values=collect_values(args),
            install=args.install,
            create_namespace=args.create_namespace,
            wait=args.wait,
            timeout=args.timeout,
            reuse_values=args.reuse_values,
        )
    )
    print(release_out(rel, args))
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    try:
        res = asyncio.run(
            helm_sdkpy.Uninstall(config(args)).run(args.release, wait=args.wait, timeout=args.timeout)
        )
    except helm_sdkpy.ReleaseNotFoundError:
        if args.ignore_not_found:
            print(f"release {args.release} not found (ignored)")
            return 0
        raise
    print(release_out(res, args))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(release_out(asyncio.run(helm_sdkpy.Status(config(args)).run(args.release)), args))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    releases = asyncio.run(helm_sdkpy.List(config(args)).run(all=args.all))
    print(release_out(releases or [], args))  # the library answers None when empty
    return 0


def cmd_show_values(args: argparse.Namespace) -> int:
    print(asyncio.run(helm_sdkpy.Show(config(args)).values(args.chart)), end="")
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    print(
        "helm.py: error: template is not supported: helm_sdkpy "
        f"{helm_sdkpy.__version__} has no template/dry-run action",
        file=sys.stderr,
    )
    return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="helm.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-n", "--namespace", default="default")
        sp.add_argument("-o", "--output", choices=["summary", "json", "manifest"], default="summary",
                        help="how release commands print the release (default: summary)")
        sp.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG")
        sp.add_argument("--kube-context", default=None)

    def values_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-f", "--values", action="append", metavar="FILE")
        sp.add_argument("--set-json", action="append", metavar="JSON")
        sp.add_argument("--set", action="append", metavar="K=V")
        sp.add_argument("--wait", action="store_true", help="wait until resources are ready")
        sp.add_argument("--timeout", type=int, default=300, metavar="SECS")
        sp.add_argument("--create-namespace", action="store_true")

    sp = sub.add_parser("lint", help="lint a chart (fails on errors; --strict: on warnings)")
    sp.add_argument("chart")
    sp.add_argument("--strict", action="store_true")
    sp.add_argument("-v", "--verbose", action="store_true", help="also show INFO messages")
    common(sp)
    sp.set_defaults(fn=cmd_lint)

    sp = sub.add_parser("install", help="install a chart")
    sp.add_argument("release")
    sp.add_argument("chart")
    common(sp)
    values_opts(sp)
    sp.set_defaults(fn=cmd_install)

    sp = sub.add_parser("upgrade", help="upgrade a release")
    sp.add_argument("release")
    sp.add_argument("chart")
    sp.add_argument("-i", "--install", action="store_true", help="install if absent")
    sp.add_argument("--reuse-values", action="store_true")
    common(sp)
    values_opts(sp)
    sp.set_defaults(fn=cmd_upgrade)

    sp = sub.add_parser("uninstall", help="uninstall a release")
    sp.add_argument("release")
    sp.add_argument("--wait", action="store_true", help="wait until resources are deleted")
    sp.add_argument("--timeout", type=int, default=300, metavar="SECS")
    sp.add_argument("--ignore-not-found", action="store_true")
    common(sp)
    sp.set_defaults(fn=cmd_uninstall)

    sp = sub.add_parser("status", help="show a release")
    sp.add_argument("release")
    common(sp)
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("list", help="list releases in the namespace")
    sp.add_argument("-a", "--all", action="store_true")
    common(sp)
    sp.set_defaults(fn=cmd_list)

    sp = sub.add_parser("show-values", help="print a chart's values.yaml")
    sp.add_argument("chart")
    common(sp)
    sp.set_defaults(fn=cmd_show_values)

    sp = sub.add_parser("template", help="not supported by helm_sdkpy")
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_template)
    return p


def main() -> int:
    args = parser().parse_args()
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"helm.py: error: {e}", file=sys.stderr)
        return 2
    except (helm_sdkpy.HelmError, OSError, yaml.YAMLError) as e:
        print(f"helm.py: error: {args.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
