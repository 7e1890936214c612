#!/usr/bin/python3
"""Full and incremental backups of a Parallax snapshot over NBD, with libnbd.

    nbd-backup.py full URI FILE
        Copies the export URI (e.g. nbd+unix:///vm@monday?socket=S) into a
        new sparse raw FILE, reading only what base:allocation says holds
        data.

    nbd-backup.py incremental URI BASE FILE
        FILE is a backup of snapshot BASE of the same disk (made by this
        script, or any raw copy of it). Brings FILE to the export URI (a
        later snapshot, e.g. vm@tuesday) reading only the blocks that the
        qemu:dirty-bitmap:BASE context marks as changed; ranges that now
        read as zeros are written as zeros.

Prints one JSON line: {"read_bytes": N, "zeroed_bytes": N, "size": N}.
Exit 1 with a message on stderr on any error. Debian: python3-libnbd.
"""

import json
import os
import sys

import nbd

CHUNK = 32 << 20  # bytes asked for per BLOCK_STATUS and per READ, at most
DIRTY = 1  # bit 0 of a qemu:dirty-bitmap extent


def extents(h, context, offset, length):
    """(offset, length, flags) of `context` over [offset, offset+length)."""
    found = []

    def callback(meta, start, entries, err):
        if meta == context:
            at = start
            for i in range(0, len(entries), 2):
                found.append((at, entries[i], entries[i + 1]))
                at += entries[i]
        return 0

    h.block_status(length, offset, callback)
    return found


def walk(h, context):
    """Every extent of `context`, over the whole export."""
    size = h.get_size()
    offset = 0
    while offset < size:
        found = extents(h, context, offset, min(CHUNK, size - offset))
        if not found:
            raise RuntimeError("the server returned no extents at %d" % offset)
        for start, length, flags in found:
            length = min(length, size - start)
            if length > 0:
                yield start, length, flags
            offset = start + length


def copy(h, out, start, length):
    done = 0
    while done < length:
        n = min(CHUNK, length - done)
        out.seek(start + done)
        out.write(h.pread(n, start + done))
        done += n
    return done


def zero(out, start, length):
    """Writes zeros over [start, start+length) of `out`."""
    zeros = bytes(min(CHUNK, length))
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        out.seek(start + done)
        out.write(zeros[:n])
        done += n


def connect(uri, contexts):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    for c in contexts:
        if not h.can_meta_context(c):
            raise RuntimeError("the server does not offer %s for %s" % (c, uri))
    return h


def full(uri, path):
    h = connect(uri, [nbd.CONTEXT_BASE_ALLOCATION])
    size = h.get_size()
    read = 0
    with open(path, "xb") as out:
        out.truncate(size)
        for start, length, flags in walk(h, nbd.CONTEXT_BASE_ALLOCATION):
            if not flags & nbd.STATE_HOLE:
                read += copy(h, out, start, length)
        out.flush()
        os.fsync(out.fileno())
    h.shutdown()
    return {"read_bytes": read, "zeroed_bytes": 0, "size": size}


def incremental(uri, base, path):
    context = "qemu:dirty-bitmap:" + base
    h = connect(uri, [nbd.CONTEXT_BASE_ALLOCATION, context])
    size = h.get_size()
    dirty = [(s, n) for s, n, f in walk(h, context) if f & DIRTY]
    read = zeroed = 0
    with open(path, "r+b") as out:
        if os.fstat(out.fileno()).st_size < size:
            out.truncate(size)
        for start, length in dirty:
            # Within a changed range, what now reads as zeros is zeroed
            # rather than read.
            for s, n, f in extents(h, nbd.CONTEXT_BASE_ALLOCATION, start, length):
                n = min(n, start + length - s)
                if n <= 0:
                    continue
                if f & nbd.STATE_ZERO:
                    zero(out, s, n)
                    zeroed += n
                else:
                    read += copy(h, out, s, n)
        out.flush()
        os.fsync(out.fileno())
    h.shutdown()
    return {"read_bytes": read, "zeroed_bytes": zeroed, "size": size}


def main(argv):
    try:
        if len(argv) == 4 and argv[1] == "full":
            result = full(argv[2], argv[3])
        elif len(argv) == 5 and argv[1] == "incremental":
            result = incremental(argv[2], argv[3], argv[4])
        else:
            sys.stderr.write(__doc__)
            return 2
    except (nbd.Error, OSError, RuntimeError) as e:
        sys.stderr.write("nbd-backup: %s\n" % e)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
