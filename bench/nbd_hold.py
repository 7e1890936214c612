#!/usr/bin/env python3
"""Open one NBD connection per export, write data through each, keep them open.

A dependency-free NBD client (fixed newstyle handshake, NBD_OPT_GO, simple
replies) used by bench scenario f: one process holds many connections
(cheaper than one nbdsh per disk, and python3-libnbd is not needed).

  nbd_hold.py SOCKET READY_FILE MIB_PER_EXPORT EXPORT...

For each export: connect, write MIB_PER_EXPORT MiB of random data in 1 MiB
writes, FLUSH, read 4 KiB back and check it. Then write READY_FILE and
sleep until SIGTERM, when it sends NBD_CMD_DISC on every connection.
"""
import os
import signal
import socket
import struct
import sys
import time

OPT_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
REP_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_REPLY = 0x67446698
OPT_GO, REP_ACK, REP_INFO = 7, 1, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return bytes(buf)


def connect(path, export):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(s, 18))
    if magic != 0x4E42444D41474943 or opt != OPT_MAGIC:
        raise RuntimeError("not a newstyle NBD server")
    s.sendall(struct.pack(">I", 1 | 2))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", OPT_MAGIC, OPT_GO, len(data)) + data)
    size = None
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        payload = recv_exact(s, length)
        if magic != REP_MAGIC:
            raise RuntimeError("bad option reply magic")
        if rtype == REP_ACK:
            break
        if rtype & 0x80000000:
            raise RuntimeError(f"{export}: NBD_OPT_GO refused ({rtype:#x}): {payload[4:]!r}")
        if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
            size = struct.unpack(">Q", payload[2:10])[0]
    return s, size


HANDLE = [0]


def request(s, cmd, offset=0, length=0, data=b""):
    HANDLE[0] += 1
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, HANDLE[0], offset, length) + data)
    if cmd == CMD_DISC:
        return b""
    magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    if magic != SIMPLE_REPLY or handle != HANDLE[0]:
        raise RuntimeError("unexpected reply")
    if err:
        raise RuntimeError(f"NBD error {err}")
    return recv_exact(s, length) if cmd == CMD_READ else b""


def main():
    path, ready, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
    exports = sys.argv[4:]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    conns = []
    for e in exports:
        s, _size = connect(path, e)
        first = b""
        for i in range(mib):
            block = os.urandom(1 << 20)
            if i == 0:
                first = block[:4096]
            request(s, CMD_WRITE, i << 20, len(block), block)
        request(s, CMD_FLUSH)
        got = request(s, CMD_READ, 0, 4096)
        if mib and got != first:
            raise RuntimeError(f"{e}: read back differs")
        conns.append(s)
    with open(ready, "w") as f:
        f.write(f"{len(conns)}\n")
    deadline = time.time() + 3600
    while not stop and time.time() < deadline:
        time.sleep(0.2)
    for s in conns:
        request(s, CMD_DISC)
        s.close()


if __name__ == "__main__":
    main()
