#!/usr/bin/env python3
"""Per-kernel machine code of a cubin: instructions (16 bytes each), an md5
of the kernel's .text section, and the demangled name, one kernel a line.

Used to show that a restructuring left the shipped kernels unchanged
without cuobjdump (not installed on the build machine):

    nvcc $(NVCCFLAGS) -Ikernels -cubin -o /tmp/a.cubin kernels/attention.cu
    (the same on the other tree into /tmp/b.cubin)
    diff <(bench/dev/cubin_text.py /tmp/a.cubin) \\
         <(bench/dev/cubin_text.py /tmp/b.cubin)

    bench/dev/cubin_text.py --regs /tmp/a.cubin /tmp/b.cubin

The second form compares the kernels of two cubins instruction by
instruction: for each kernel whose code differs it counts the differing
instructions and those that still differ with the bits where sm_90
encodes its register operands masked out (destination 16-23, sources
24-31, 32-39 and 64-71).  "0 beyond the register fields" with equal
lengths means the same opcodes in the same order, registers renamed: a
restructuring that only moved where values are computed.  An immediate
stored in those bits would be masked too, so it is evidence, not proof.
"""
import hashlib
import struct
import subprocess
import sys


def sections(path, body=False):
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
            code = d[s[4]:s[4] + s[5]]
            yield (nm[6:], s[5] // 16,
                   code if body else hashlib.md5(code).hexdigest()[:10])


def demangle(name):
    try:
        return subprocess.run(['c++filt', name], capture_output=True,
                              text=True).stdout.strip() or name
    except OSError:
        return name


REG_BITS = (0xff << 16) | (0xff << 24) | (0xff << 32) | (0xff << 64)


def compare(a_path, b_path):
    a = {nm: code for nm, _, code in sections(a_path, True)}
    b = {nm: code for nm, _, code in sections(b_path, True)}
    for nm in sorted(set(a) | set(b)):
        x, y = a.get(nm), b.get(nm)
        if x == y:
            continue
        if x is None or y is None or len(x) != len(y):
            what = 'absent' if x is None or y is None else 'length'
            print(f"{demangle(nm)}: {what} differs "
                  f"({len(x or b'') // 16} / {len(y or b'') // 16})")
            continue
        n = len(x) // 16
        diff = beyond = 0
        for i in range(n):
            u = int.from_bytes(x[16 * i:16 * i + 16], 'little')
            v = int.from_bytes(y[16 * i:16 * i + 16], 'little')
            if u != v:
                diff += 1
                beyond += (u & ~REG_BITS) != (v & ~REG_BITS)
        print(f"{demangle(nm)}: {n} instructions, {diff} differ, {beyond} "
              f"beyond the register fields")


if len(sys.argv) == 4 and sys.argv[1] == '--regs':
    compare(sys.argv[2], sys.argv[3])
else:
    for name, n, h in sorted(sections(sys.argv[1])):
        print(f"{n:6d} {h} {demangle(name)}")
