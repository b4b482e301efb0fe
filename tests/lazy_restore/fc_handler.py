#!/usr/bin/env python3
"""A page-fault handler written from Firecracker's published protocol
(docs/snapshotting/handling-page-faults-on-snapshot-resume.md and its example handlers),
independent of faultline's own code: it listens on a Unix socket, receives ONE message
whose data is a JSON array of {"base_host_virt_addr", "size", "offset", "page_size"} and
whose SCM_RIGHTS carries the userfaultfd, maps the flat memory file, and serves MISSING
faults with UFFDIO_COPY from `offset` in that file (UFFDIO_ZEROPAGE for pages removed by
MADV_DONTNEED, as Firecracker's examples do).

usage: fc_handler.py SOCKET MEMORY_FILE [serve|die-after=N|hang-after=N]
  serve        serve until the VMM closes the connection
  die-after=N  serve N faults, then exit (a handler that dies mid-way)
  hang-after=N serve N faults, then keep reading faults without ever answering
"""
import ctypes
import errno
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import sys

# <linux/userfaultfd.h>: _IOWR(0xAA, nr, struct) / _IOR(0xAA, nr, struct)
UFFDIO_WAKE = 0x8010AA02  # struct uffdio_range {u64 start, len}
UFFDIO_COPY = 0xC028AA03  # struct uffdio_copy {u64 dst, src, len, mode; s64 copy}
UFFDIO_ZEROPAGE = 0xC020AA04  # struct uffdio_zeropage {range; u64 mode; s64 zeropage}
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_REMOVE = 0x15
MSG_SIZE = 32  # struct uffd_msg


def main():
    sock_path, mem_path = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else "serve"
    limit = int(mode.split("=")[1]) if "=" in mode else -1

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path + ".tmp")
    listener.listen(1)
    os.rename(sock_path + ".tmp", sock_path)
    conn, _ = listener.accept()
    msg, fds, _, _ = socket.recv_fds(conn, 65536, 1)
    regions = json.loads(msg)
    uffd = fds[0]

    memory = open(mem_path, "rb")
    size = os.fstat(memory.fileno()).st_size
    # Firecracker's handlers check the regions cover the memory file exactly.
    assert sum(r["size"] for r in regions) == size, (regions, size)
    backing = mmap.mmap(memory.fileno(), size, access=mmap.ACCESS_COPY)
    backing_addr = ctypes.addressof(ctypes.c_char.from_buffer(backing))

    zeros = ctypes.create_string_buffer(2 << 20)  # the source of zero huge pages
    removed = []  # (start, end) host ranges: zero from now on
    served = 0
    pending = []
    while True:
        ready, _, _ = select.select([uffd, conn], [], [], 0.001 if pending else 1.0)
        if conn in ready and not conn.recv(1, socket.MSG_PEEK):
            print(f"fc_handler: VMM went away after {served} faults", file=sys.stderr)
            return
        while True:
            try:
                raw = os.read(uffd, MSG_SIZE * 16)
            except BlockingIOError:
                break
            for at in range(0, len(raw), MSG_SIZE):
                event = raw[at]
                if event == UFFD_EVENT_PAGEFAULT:
                    _flags, address = struct.unpack_from("QQ", raw, at + 8)
                    pending.append(address)
                elif event == UFFD_EVENT_REMOVE:
                    start, end = struct.unpack_from("QQ", raw, at + 8)
                    removed.append((start, end))
        while pending:
            if served == limit:
                if mode.startswith("die-after"):
                    print(f"fc_handler: dying after {served} faults", file=sys.stderr)
                    os._exit(0)
                pending.clear()  # hang-after: read, never answer
                break
            address = pending[0]
            region = next(r for r in regions
                          if r["base_host_virt_addr"] <= address < r["base_host_virt_addr"] + r["size"])
            page_size = region["page_size"]
            page = address & ~(page_size - 1)
            try:
                if any(s <= page < e for s, e in removed) and page_size == 4096:
                    arg = bytearray(struct.pack("QQQq", page, page_size, 0, 0))
                    fcntl.ioctl(uffd, UFFDIO_ZEROPAGE, arg, True)
                else:
                    src = backing_addr + region["offset"] + (page - region["base_host_virt_addr"])
                    if any(s <= page < e for s, e in removed):
                        src = ctypes.addressof(zeros)
                    arg = bytearray(struct.pack("QQQQq", page, src, page_size, 0, 0))
                    fcntl.ioctl(uffd, UFFDIO_COPY, arg, True)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    break  # a REMOVE is pending: read events, then retry
                if e.errno != errno.EEXIST:
                    raise
                fcntl.ioctl(uffd, UFFDIO_WAKE, bytearray(struct.pack("QQ", page, page_size)), True)
            pending.pop(0)
            served += 1


if __name__ == "__main__":
    main()
