"""Reading the project's files from Python, for the PyTorch peers:
model configs (key=value lines), checkpoints (docs/checkpoint.md) and token
shards (docs/data.md). The parameter table and the config field list come
from the float64 reference (scripts/reference/moe_reference.py), so the
tensor order and shapes are defined once on the Python side too.

Every reader rejects a bad file with a ValueError naming the file and what
is wrong. Checkpoint payload checksums (XXH64) are not recomputed here:
`moe_ckpt verify FILE` does that; sizes, dtypes and the layout are checked.
"""

import glob
import os
import re
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "reference"))
from moe_reference import CONFIG_FIELDS, OPTIONAL_FIELDS, param_table  # noqa: E402  (one parameter table)

__all__ = ["CONFIG_FIELDS", "param_table", "parse_config", "read_config_file", "Checkpoint", "read_shards"]


# ----------------------------------------------------------------------------
# Model configs: the key=value lines of model/config.c's config_write (also
# what `train_moe --print-config` prints, with a few summary lines after them).

def parse_config(text, where):
    """key=value lines -> dict of every field of CONFIG_FIELDS. Other lines
    (the summary lines of --print-config: "total parameters: ...") are
    ignored; an unknown key, a bad value or a missing field is an error
    naming `where`. The fields added later (OPTIONAL_FIELDS) default to 0."""
    kinds = dict(CONFIG_FIELDS + OPTIONAL_FIELDS)
    cfg = {k: 0 for k, _ in OPTIONAL_FIELDS}
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$", line)
        if not m:
            continue
        key, value = m.group(1), m.group(2).strip()
        if key not in kinds:
            raise ValueError("%s: unknown model field '%s'" % (where, key))
        try:
            if kinds[key] == "int":
                cfg[key] = int(value)
            elif kinds[key] == "float":
                cfg[key] = float(value)
            elif value in ("sigmoid", "softmax"):
                cfg[key] = value
            else:
                raise ValueError(value)
        except ValueError:
            raise ValueError("%s: bad value '%s' for model field '%s'" % (where, value, key)) from None
    missing = [k for k, _ in CONFIG_FIELDS if k not in cfg]
    if missing:
        raise ValueError("%s: model fields missing: %s" % (where, ", ".join(missing)))
    return cfg


def read_config_file(path):
    with open(path, encoding="utf-8") as f:
        return parse_config(f.read(), path)


# ----------------------------------------------------------------------------
# Checkpoints (docs/checkpoint.md, version 1): a 64-byte header, the payloads,
# then a table of 104-byte entries.

CKPT_DTYPES = {0: ("bytes", 1), 1: ("text", 1), 2: ("<f4", 4), 3: ("<i4", 4), 4: ("<i8", 8), 5: ("<u8", 8)}


class Checkpoint:
    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)
        self.f = open(path, "rb")
        head = self.f.read(64)
        if len(head) < 64:
            raise ValueError("%s: truncated: %d bytes, fewer than the 64-byte header" % (path, len(head)))
        magic, version, n, table_off, file_size = struct.unpack_from("<8sIIQQ", head)
        if magic != b"MOE-CKPT":
            raise ValueError("%s: not a checkpoint (bad magic)" % path)
        if version != 1:
            raise ValueError("%s: checkpoint version %d, this reader reads version 1" % (path, version))
        if file_size != self.size or table_off + 104 * n != self.size:
            raise ValueError("%s: truncated or damaged: the header says %d bytes (table at %d, %d sections), "
                             "the file has %d" % (path, file_size, table_off, n, self.size))
        self.f.seek(table_off)
        self.sections = {}
        for i in range(n):
            e = self.f.read(104)
            name = e[:64].rstrip(b"\0").decode("ascii", "replace")
            dtype, _, off, nbytes = struct.unpack_from("<IIQQ", e, 64)
            if dtype not in CKPT_DTYPES or nbytes % CKPT_DTYPES[dtype][1] or off + nbytes > table_off:
                raise ValueError("%s: section table entry %d ('%s') is damaged" % (path, i, name))
            self.sections[name] = (dtype, off, nbytes)

    def _raw(self, name, want_dtype):
        if name not in self.sections:
            raise ValueError("%s: no section '%s'" % (self.path, name))
        dtype, off, nbytes = self.sections[name]
        if dtype != want_dtype:
            raise ValueError("%s: section '%s' has dtype %d, expected %d" % (self.path, name, dtype, want_dtype))
        self.f.seek(off)
        return self.f.read(nbytes)

    def text(self, name):
        return self._raw(name, 1).decode("utf-8")

    def array(self, name, dtype_code):
        return np.frombuffer(self._raw(name, dtype_code), dtype=CKPT_DTYPES[dtype_code][0])

    def config(self):
        return parse_config(self.text("model_config"), self.path + " (model_config)")

    def options(self):
        """The trainer's options section ("key = value" lines) as a dict of strings."""
        out = {}
        for line in self.text("options").splitlines():
            if " = " in line:
                k, v = line.split(" = ", 1)
                out[k] = v
        return out

    def tensors(self, cfg, section):
        """A flat f32 section (params, adam_m, adam_v) cut into the named tensors of param_table."""
        flat = self.array(section, 2)
        table = param_table(cfg)
        total = sum(int(np.prod(shape)) for _, shape, _ in table)
        if flat.size != total:
            raise ValueError("%s: section '%s' holds %d floats, the model has %d parameters"
                             % (self.path, section, flat.size, total))
        out, at = {}, 0
        for name, shape, _ in table:
            n = int(np.prod(shape))
            out[name] = flat[at:at + n].reshape(shape)
            at += n
        return out

    def close(self):
        self.f.close()


# ----------------------------------------------------------------------------
# Token shards (docs/data.md, version 1): a 64-byte header, then u16 or u32 tokens.

def read_shards(pattern):
    """Every shard a comma-separated list of globs matches, sorted by name as the
    project's loader does. Returns (list of token arrays, vocabulary size)."""
    paths = sorted(set(p for g in pattern.split(",") for p in glob.glob(g)))
    if not paths:
        raise ValueError("%s: no shard matches" % pattern)
    shards, vocab = [], None
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(64)
        if len(head) < 64:
            raise ValueError("%s: file has %d bytes, fewer than the 64-byte shard header" % (p, len(head)))
        magic, version, width, count, v = struct.unpack_from("<8sIIQI", head)
        if magic != b"MOESHARD" or version != 1 or width not in (2, 4):
            raise ValueError("%s: not a version-1 token shard" % p)
        if os.path.getsize(p) != 64 + count * width:
            raise ValueError("%s: header says %d tokens but the file has %d bytes" % (p, count, os.path.getsize(p)))
        if vocab is not None and v != vocab:
            raise ValueError("%s: vocabulary %d differs from the other shards' %d" % (p, v, vocab))
        vocab = v
        shards.append(np.memmap(p, dtype="<u2" if width == 2 else "<u4", mode="r", offset=64, shape=(count,)))
    return shards, vocab
