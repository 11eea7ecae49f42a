#!/usr/bin/env python3
"""Seeds for the `gguf` fuzz target (node/fuzz), cut from real GGUF files.

    python3 testnet/gguf-seeds.py OUT_DIR FILE.gguf [FILE.gguf ...]

A real model's header is megabytes (the vocabulary and merges), too big to mutate ten million
times. For each file this writes two seeds that keep its real structure:

- NAME-index: every metadata entry and the first INDEX_TENSORS entries of the tensor index as
  the file has them, with the vocabulary arrays cut to their first TOKENS entries and the
  merges to the first MERGES whose parts and result are among them; no tensor data, so the
  tensor extents are checked and refused.
- NAME-small: the same metadata, the first few tensors each cut to one block of its own type,
  and their data, so the tensor extents fit and every check runs to the end.

Only a prefix of the file is read (enough for the header), so a split download's first part
will do.
"""

import struct
import sys
from pathlib import Path

TOKENS = 320
INDEX_TENSORS = 32
MERGES = 64
SMALL_TENSORS = 4
ALIGN = 32
# ggml type -> (block size, bytes per block)
BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
          8: (32, 34), 9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144),
          13: (256, 176), 14: (256, 210), 15: (256, 292), 30: (1, 2)}
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, kind):
        if kind == 8:
            return self.string()
        if kind == 9:
            elem = self.take("<I")
            return (elem, [self.value(elem) for _ in range(self.take("<Q"))])
        return self.take(SCALARS[kind])


def put_string(s):
    return struct.pack("<Q", len(s)) + s


def put_value(kind, v):
    if kind == 8:
        return put_string(v)
    if kind == 9:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(put_value(elem, x) for x in items)
    return struct.pack(SCALARS[kind], v)


def read_header(path):
    # The header of a 250 MB model is a few MB; read generously.
    data = Path(path).open("rb").read(64 << 20)
    r = Reader(data)
    magic, version = r.take("<I"), r.take("<I")
    assert magic == 0x46554747 and version in (2, 3), f"{path}: not a GGUF v2/v3 file"
    tensors, entries = r.take("<Q"), r.take("<Q")
    metadata = []
    for _ in range(entries):
        key = r.string()
        kind = r.take("<I")
        metadata.append((key, kind, r.value(kind)))
    infos = []
    for _ in range(tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        infos.append((name, dims, r.take("<I"), r.take("<Q")))
    return version, metadata, infos


def shrink(metadata):
    tokens = next(v[1] for k, _, v in metadata if k == b"tokenizer.ggml.tokens")
    n = len(tokens)
    kept = set(tokens[:TOKENS])
    out = []
    for key, kind, value in metadata:
        if key == b"tokenizer.ggml.merges":
            merges = [m for m in value[1]
                      if len(m.split(b" ")) == 2 and set(m.split(b" ")) <= kept
                      and m.replace(b" ", b"") in kept]
            value = (value[0], merges[:MERGES])
        elif kind == 9 and len(value[1]) == n:
            value = (value[0], value[1][:TOKENS])
        out.append((key, kind, value))
    return out


def file(version, metadata, infos, data=b""):
    out = struct.pack("<IIQQ", 0x46554747, version, len(infos), len(metadata))
    out += b"".join(put_string(k) + struct.pack("<I", t) + put_value(t, v) for k, t, v in metadata)
    for name, dims, kind, offset in infos:
        out += put_string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset)
    out += b"\0" * (-len(out) % ALIGN)
    return out + data


def small(infos):
    cut, data = [], b""
    for name, dims, kind, _ in infos[:SMALL_TENSORS]:
        block, size = BLOCKS[kind]
        cut.append((name, [block] + [1] * (len(dims) - 1), kind, len(data)))
        data += bytes(size) + b"\0" * (-size % ALIGN)
    return cut, data


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for path in sys.argv[2:]:
        version, metadata, infos = read_header(path)
        metadata = shrink(metadata)
        stem = Path(path).name.split(".gguf")[0]
        index = file(version, metadata, infos[:INDEX_TENSORS])
        few, data = small(infos)
        tiny = file(version, metadata, few, data)
        (out / f"{stem}-index").write_bytes(index)
        (out / f"{stem}-small").write_bytes(tiny)
        print(f"{stem}: {len(infos)} tensors; seeds of {len(index)} and {len(tiny)} bytes")


if __name__ == "__main__":
    main()
