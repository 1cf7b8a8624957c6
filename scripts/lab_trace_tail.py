#!/usr/bin/env python3
"""The last steps of a router-score trace, as a trace without its end record.

    python3 scripts/lab_trace_tail.py IN.trace FIRST_STEP OUT.trace

Copies IN's header and its records of the steps >= FIRST_STEP byte for byte
(docs/trace.md; each record carries its own checksum, so nothing is recomputed)
and writes no end record: read it with `moe_replay --trace-unfinished`, which
checks every record as it reads. For regret on a part of a run, e.g. the
steps after the router has stopped drifting. Refuses an existing OUT.
"""
import struct
import sys


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__.split("\n\n")[1])
    src, first, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = open(src, "rb").read()
    if len(data) < 80 or data[:8] != b"MOETRACE":
        sys.exit(f"{src}: not a router-score trace (no MOETRACE header)")
    flags, n_layers, E = struct.unpack_from("<iii", data, 12)
    tokens, m_rows = struct.unpack_from("<qq", data, 32)  # tokens per step, rows recorded per step
    if m_rows != tokens:
        sys.exit(f"{src}: a sampled trace (M < tokens per step); only full traces are cut here")
    width = 2 if flags & 1 else 4
    rec = 32 + 12 * E + width * m_rows * E + 8  # one record (docs/trace.md)
    out = [data[:80]]
    off = 80
    while off + 4 <= len(data) and data[off : off + 4] == b"TREC":
        if off + rec > len(data):
            sys.exit(f"{src}: truncated record at byte {off}")
        step = struct.unpack_from("<q", data, off + 8)[0]
        if step >= first:
            out.append(data[off : off + rec])
        off += rec
    if len(out) == 1:
        sys.exit(f"{src}: no step >= {first}")
    try:
        with open(dst, "xb") as f:
            f.write(b"".join(out))
    except FileExistsError:
        sys.exit(f"{dst}: exists, not overwritten")
    print(f"{dst}: {(len(out) - 1) // n_layers} steps from step {first} of {src}")


if __name__ == "__main__":
    main()
