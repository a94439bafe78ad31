#!/usr/bin/env python3
"""Measure a TCP path (direct or through a tunnel) on loopback.

  tunnel_bench.py echo PORT [--proxy]            # run an echo server (foreground); --proxy:
                                                 #   each connection starts with a PROXY
                                                 #   protocol header (v1 or v2), not echoed
  tunnel_bench.py latency HOST:PORT [N]          # N sequential 64-byte echoes -> median/p99 us
  tunnel_bench.py connrate HOST:PORT [N]         # N sequential connect+1 byte echo+close -> conns/s
  tunnel_bench.py concurrent HOST:PORT [N]       # N connections open at once, each echoes 1 KiB
  tunnel_bench.py iperf HOST:PORT [SECS]         # iperf3 up and down (needs iperf3 -s behind it)
  tunnel_bench.py rss PID...                     # peak RSS (VmHWM) in MiB of each pid
Every command prints one JSON line.
"""
import asyncio, json, socket, statistics, subprocess, sys, time


def addr(s):
    h, p = s.rsplit(":", 1)
    return h, int(p)


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


async def skip_proxy_header(r):
    """Reads the PROXY protocol header (v1 text line or v2 binary) a connection starts with."""
    head = await r.readexactly(12)
    if head == PROXY_V2_SIGNATURE:
        rest = await r.readexactly(4)  # version/command, family/protocol, length
        await r.readexactly(int.from_bytes(rest[2:4], "big"))
    elif head.startswith(b"PROXY "):
        if not head.endswith(b"\r\n"):
            await r.readuntil(b"\r\n")
    else:
        raise ConnectionError(f"no PROXY protocol header: {head!r}")


def echo_server(port, proxy=False):
    async def handle(r, w):
        try:
            if proxy:
                await skip_proxy_header(r)
            while True:
                b = await r.read(65536)
                if not b:
                    break
                w.write(b)
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        async with srv:
            await srv.serve_forever()

    asyncio.run(main())


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return buf


def latency(target, n=5000):
    s = socket.create_connection(addr(target))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    for _ in range(200):  # warm-up
        s.sendall(msg); recv_exact(s, 64)
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        s.sendall(msg); recv_exact(s, 64)
        out.append((time.perf_counter_ns() - t) / 1000)
    s.close()
    out.sort()
    return {"median_us": round(statistics.median(out), 1), "p99_us": round(out[int(len(out) * 0.99)], 1), "n": n}


def connrate(target, n=1000):
    a = addr(target)
    t = time.perf_counter()
    for _ in range(n):
        s = socket.create_connection(a)
        s.sendall(b"x"); recv_exact(s, 1); s.close()
    dt = time.perf_counter() - t
    return {"conns_per_s": round(n / dt, 1), "n": n}


def concurrent(target, n=1000):
    async def one(i):
        r, w = await asyncio.open_connection(*addr(target))
        payload = bytes([i % 251]) * 1024
        w.write(payload); await w.drain()
        got = await r.readexactly(1024)
        w.close()
        return got == payload

    async def main():
        t = time.perf_counter()
        res = await asyncio.gather(*(asyncio.wait_for(one(i), 30) for i in range(n)), return_exceptions=True)
        ok = sum(1 for x in res if x is True)
        return {"ok": ok, "n": n, "secs": round(time.perf_counter() - t, 2)}

    return asyncio.run(main())


def iperf(target, secs=5):
    h, p = addr(target)
    res = {}
    for name, extra in (("up_gbps", []), ("down_gbps", ["-R"])):
        out = subprocess.run(["iperf3", "-c", h, "-p", str(p), "-t", str(secs), "-J"] + extra,
                             capture_output=True, text=True, timeout=secs + 30)
        j = json.loads(out.stdout)
        res[name] = round(j["end"]["sum_received"]["bits_per_second"] / 1e9, 2)
    return res


def rss(pids):
    res = {}
    for pid in pids:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                res[pid] = round(int(line.split()[1]) / 1024, 1)
    return res


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "echo":
        echo_server(int(args[0]), proxy="--proxy" in args[1:])
    elif cmd == "rss":
        print(json.dumps(rss(args)))
    else:
        fn = {"latency": latency, "connrate": connrate, "concurrent": concurrent, "iperf": iperf}[cmd]
        print(json.dumps(fn(args[0], *(int(x) for x in args[1:]))))
