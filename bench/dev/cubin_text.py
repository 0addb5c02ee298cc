#!/usr/bin/env python3
"""Per-kernel machine code of a cubin: instructions (16 bytes each), an md5
of the kernel's .text section, and the demangled name, one kernel a line.

Used to show that a restructuring left the shipped kernels unchanged
without cuobjdump (not installed on the build machine):

    nvcc $(NVCCFLAGS) -Ikernels -cubin -o /tmp/a.cubin kernels/attention.cu
    (the same on the other tree into /tmp/b.cubin)
    diff <(bench/dev/cubin_text.py /tmp/a.cubin) \\
         <(bench/dev/cubin_text.py /tmp/b.cubin)
"""
import hashlib
import struct
import subprocess
import sys


def sections(path):
    d = open(path, 'rb').read()
    if d[:4] != b'\x7fELF' or d[4] != 2:
        sys.exit(f"{path}: not a 64-bit ELF cubin")
    shoff, = struct.unpack_from('<Q', d, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', d, 0x3a)
    sh = [struct.unpack_from('<IIQQQQIIQQ', d, shoff + i * shentsize)
          for i in range(shnum)]
    names = sh[shstrndx][4]
    for s in sh:
        nm = d[names + s[0]:d.index(b'\0', names + s[0])].decode()
        if nm.startswith('.text.'):
            body = d[s[4]:s[4] + s[5]]
            yield nm[6:], s[5] // 16, hashlib.md5(body).hexdigest()[:10]


def demangle(name):
    try:
        return subprocess.run(['c++filt', name], capture_output=True,
                              text=True).stdout.strip() or name
    except OSError:
        return name


for name, n, h in sorted(sections(sys.argv[1])):
    print(f"{n:6d} {h} {demangle(name)}")
