#!/usr/bin/env python3
"""Times N control-API requests made by one client on one connection.

  python3 bench/api_loop.py SOCKET METHOD PATH BODY N [--every-ms MS]

BODY may hold `{i}`, replaced by the request's number (1..N). One request
starts every MS milliseconds (0: back to back); each line printed is
"HTTP_STATUS SECONDS" for one request, the time from sending it to the end
of its answer (like curl's time_total, without a process per request: on
2 CPUs, a curl process per request costs the workload beside it more than
the request does). Exit status 1 on the first answer that is not 2xx.
Only the standard library.
"""
import argparse
import http.client
import socket
import sys
import time


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("parallax")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("socket")
    ap.add_argument("method")
    ap.add_argument("path")
    ap.add_argument("body")
    ap.add_argument("n", type=int)
    ap.add_argument("--every-ms", type=float, default=0)
    a = ap.parse_args()
    conn = UnixConnection(a.socket)
    start = time.monotonic()
    out = []
    for i in range(1, a.n + 1):
        due = start + (i - 1) * a.every_ms / 1000
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        body = a.body.replace("{i}", str(i)).encode()
        t0 = time.monotonic()
        conn.request(a.method, a.path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        took = time.monotonic() - t0
        if not 200 <= resp.status < 300:
            print(f"{a.method} {a.path}: HTTP {resp.status}: {data.decode(errors='replace')}", file=sys.stderr)
            sys.exit(1)
        out.append(f"{resp.status} {took:.6f}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
