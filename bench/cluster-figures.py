#!/usr/bin/env python3
"""Figures of the whole system in a real one-node cluster, printed as a table:

- time from `kubectl apply` of a TcpTunnel to the first byte through it (median and
  worst of 10; includes the Deployment rolling its pod to get the sidecar);
- time until bytes flow again after the relay pod is deleted (median and worst of 3);
- pgbench through the in-cluster tunnel beside pgbench straight to the pod IP;
- memory at idle: the node's Kubernetes processes, and our relay, operator and sidecar.

    bench/cluster-figures.sh          (builds the images, starts a cluster, measures, stops it)

Uses an already running cluster when CLUSTER_DIR/KUBECONFIG/NODE_IP are set.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cluster"))

from workloads import (  # noqa: E402
    ECHO_PORT,
    echo,
    echo_works,
    import_images,
    install_system,
    pods,
    postgres,
    running_ready,
    split_endpoint,
    wait_pods,
    wait_ready_tunnel,
)
from helpers import SYSTEM_NS, Kube, kubectl, wait_for  # noqa: E402
from helpers import tunnel_manifest as tunnel  # noqa: E402

NS = "localup-figures"


def apply(manifest: dict) -> None:
    kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(manifest))


def apply_to_first_byte(kube: Kube, runs: int = 10) -> list[float]:
    labels = {"app": "echo"}
    apply(echo("echo", labels))
    wait_pods(kube, NS, labels, with_sidecar=False)
    times = []
    for i in range(runs):
        started = time.monotonic()
        apply(tunnel("echo", labels, ECHO_PORT))
        host, port = split_endpoint(wait_ready_tunnel(kube, NS, "echo")["status"]["endpoint"])
        wait_for(lambda: echo_works(host, port), timeout=120, interval=0.1, what="first byte")
        times.append(time.monotonic() - started)
        print(f"  apply -> first byte, run {i + 1}: {times[-1]:.1f} s", file=sys.stderr)
        kubectl("delete", "-n", NS, "tcptunnel", "echo", "--wait=true")
        wait_pods(kube, NS, labels, with_sidecar=False)
    return times


def relay_recovery(kube: Kube, runs: int = 3) -> list[float]:
    labels = {"app": "echo"}
    apply(tunnel("echo", labels, ECHO_PORT))
    host, port = split_endpoint(wait_ready_tunnel(kube, NS, "echo")["status"]["endpoint"])
    wait_pods(kube, NS, labels, with_sidecar=True)
    wait_for(lambda: echo_works(host, port), timeout=60, what="echo through the tunnel")
    relay_labels = {"app.kubernetes.io/name": "localup-relay"}
    times = []
    for i in range(runs):
        old = pods(kube, SYSTEM_NS, relay_labels)[0]["metadata"]["name"]
        started = time.monotonic()
        kube.delete(kube.core(SYSTEM_NS, "pods", old))
        wait_for(lambda: [p for p in pods(kube, SYSTEM_NS, relay_labels)
                          if p["metadata"]["name"] != old and running_ready(p)], timeout=120, interval=0.1,
                 what="a new relay pod")
        wait_for(lambda: echo_works(host, port), timeout=120, interval=0.1, what="bytes again")
        times.append(time.monotonic() - started)
        print(f"  relay pod deleted -> bytes again, run {i + 1}: {times[-1]:.1f} s", file=sys.stderr)
    return times


def pgbench(host: str, port: int, *args: str) -> float:
    env = {**os.environ, "PGUSER": "postgres", "PGHOST": host, "PGPORT": str(port)}
    out = subprocess.run(["pgbench", "-n", *args, "postgres"], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return float(re.search(r"tps = ([\d.]+)", out).group(1))


def pgbench_ratio(kube: Kube) -> list[tuple[str, float, float]]:
    labels = {"app": "postgres"}
    apply(postgres("postgres", labels))
    apply(tunnel("mydb", labels, 5432))
    host, port = split_endpoint(wait_ready_tunnel(kube, NS, "mydb")["status"]["endpoint"])
    pod = wait_pods(kube, NS, labels, with_sidecar=True)[0]
    pod_ip = pod["status"]["podIP"]
    wait_for(lambda: subprocess.run(["pg_isready", "-h", host, "-p", str(port)]).returncode == 0, timeout=60,
             what="postgres through the tunnel")
    subprocess.run(["pgbench", "-i", "-s", "4", "-h", pod_ip, "-p", "5432", "-U", "postgres", "postgres"],
                   check=True, capture_output=True)
    results = []
    for name, args in (("select-only, 8 clients", ("-S", "-c", "8", "-j", "2", "-T", "10")),
                       ("TPC-B-like, 8 clients", ("-c", "8", "-j", "2", "-T", "10"))):
        direct = pgbench(pod_ip, 5432, *args)
        tunnelled = pgbench(host, port, *args)
        results.append((name, direct, tunnelled))
    return results


def rss_mib(pattern: str) -> dict[str, float]:
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            status = (proc / "status").read_text()
        except OSError:
            continue
        name = os.path.basename(argv[0])
        if re.search(pattern, name):
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024 if "VmRSS" in status else 0.0
            found[f"{' '.join([name, *argv[1:3]]).strip()} (pid {proc.name})"] = rss
    return found


def main() -> None:
    env = os.environ
    kube = Kube(env["KUBECONFIG"])
    import_images(env["CLUSTER_DIR"])
    if not kube.get_opt(f"/api/v1/namespaces/{SYSTEM_NS}"):
        install_system(kube, env["NODE_IP"])
    kube.delete(f"/api/v1/namespaces/{NS}")
    wait_for(lambda: not kube.get_opt(f"/api/v1/namespaces/{NS}"), timeout=120, what="old namespace gone")
    kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    wait_for(lambda: (kube.get_opt(kube.core(NS, "serviceaccounts", "default")) or {}).get("secrets"),
             timeout=30, what="default ServiceAccount")

    first_byte = apply_to_first_byte(kube)
    recovery = relay_recovery(kube)
    bench = pgbench_ratio(kube)
    time.sleep(10)
    cluster_rss = rss_mib(r"^(etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kube-proxy|containerd)")
    ours = rss_mib(r"^localup")

    print("\n| figure | value |\n|---|---|")
    print(f"| kubectl apply -> first byte (10 runs, pod rolled to get the sidecar) | median {statistics.median(first_byte):.1f} s, worst {max(first_byte):.1f} s |")
    print(f"| relay pod deleted -> bytes flow again (3 runs) | median {statistics.median(recovery):.1f} s, worst {max(recovery):.1f} s |")
    for name, direct, tunnelled in bench:
        print(f"| pgbench {name}: tunnel vs pod IP | {tunnelled:.0f} vs {direct:.0f} tps ({tunnelled / direct:.2f}x) |")
    print(f"| node: Kubernetes processes RSS at idle | {sum(cluster_rss.values()):.0f} MiB ({len(cluster_rss)} processes) |")
    for name, rss in sorted(ours.items()):
        print(f"| {name} RSS at idle | {rss:.1f} MiB |")
    kube.delete(f"/api/v1/namespaces/{NS}")


if __name__ == "__main__":
    main()
