#!/usr/bin/env python3
"""Lists the functions a run of a binary executes, in the order they first run.

Used to build the release linker's section ordering (see docs/bench-boot.md): the code
a run needs is linked together, so the kernel's 64 KiB fault-around maps less unused code.

There is no hardware PMU to sample on the hosts this project is developed on, and no
coverage tooling in the stable toolchain's components here, so this puts a breakpoint
(int3) on every function of the binary through ptrace, and removes each one the first
time it is hit: one trap per function that runs, whatever the run's length.

    scripts/trace-functions.py BINARY -- ARGS... > functions.txt

Prints one symbol per line (as `nm` names them); the run's own output goes to stderr. Root (or ptrace rights) needed.
"""
import ctypes
import os
import signal
import subprocess
import sys

PTRACE_TRACEME, PTRACE_CONT, PTRACE_GETREGS, PTRACE_SETREGS = 0, 7, 12, 13
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACECLONE, PTRACE_O_EXITKILL = 0x8, 0x100000
WALL = 0x40000000
RIP = 16  # index of rip in struct user_regs_struct

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long


def functions(binary):
    """Address -> name of every defined function with a size."""
    out = subprocess.run(["nm", "-S", "--defined-only", binary], capture_output=True, text=True, check=True)
    table = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tTwW" and int(parts[1], 16) > 0:
            table.setdefault(int(parts[0], 16), parts[3])
    return table


def main():
    if "--" not in sys.argv:
        sys.exit(__doc__)
    binary = sys.argv[1]
    args = sys.argv[sys.argv.index("--") + 1 :]
    table = functions(binary)
    pid = os.fork()
    if pid == 0:
        libc.ptrace(PTRACE_TRACEME, 0, None, None)
        os.dup2(2, 1)  # the run's own output goes to stderr, the list to stdout
        os.execv(binary, [binary] + args)
    os.waitpid(pid, WALL)
    libc.ptrace(PTRACE_SETOPTIONS, pid, None, ctypes.c_void_p(PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL))
    original = {}
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        for address in table:
            mem.seek(address)
            original[address] = mem.read(1)
            mem.seek(address)
            mem.write(b"\xcc")
        order = []
        regs = (ctypes.c_ulonglong * 27)()
        live = {pid}
        libc.ptrace(PTRACE_CONT, pid, None, None)
        while live:
            try:
                tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                live.discard(tid)
                continue
            live.add(tid)
            deliver = 0
            sig = os.WSTOPSIG(status)
            if sig == signal.SIGTRAP and status >> 16 == 0:
                libc.ptrace(PTRACE_GETREGS, tid, None, regs)
                address = regs[RIP] - 1
                if address in original:
                    if original[address] is not None:
                        mem.seek(address)
                        mem.write(original[address])
                        original[address] = None
                        order.append(table[address])
                    regs[RIP] = address
                    libc.ptrace(PTRACE_SETREGS, tid, None, regs)
            elif sig not in (signal.SIGTRAP, signal.SIGSTOP):
                deliver = sig
            libc.ptrace(PTRACE_CONT, tid, None, ctypes.c_void_p(deliver))
    for name in order:
        print(name)


if __name__ == "__main__":
    main()
