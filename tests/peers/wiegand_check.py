#!/usr/bin/env python3
"""Checks the card reads a control panel received: an independent Wiegand decoder.

usage: wiegand_check.py PANEL_JSONL FORMAT FACILITY CARD COUNT
       wiegand_check.py --show PANEL_JSONL   (each card read as a person reads it)

PANEL_JSONL holds the panel peer's JSON lines; card reads look like
{"event": "card", "bits": N, "data": "hex"}. Written apart from keyway's Rust encoder on purpose,
so a mistake in one is caught by the other.
"""
import json
import sys

# name: (total bits, facility bits, card bits); even parity over the first half, odd over the last
FORMATS = {"h10301": (26, 8, 16), "h10304": (37, 16, 19)}


def bits_of(hexdata, n):
    raw = bytes.fromhex(hexdata)
    out = []
    for i in range(n):
        out.append((raw[i // 8] >> (7 - i % 8)) & 1)
    return out


def decode(fmt, bits):
    total, fcb, cnb = FORMATS[fmt]
    if len(bits) != total:
        raise ValueError(f"{len(bits)} bits, {fmt} has {total}")
    half = (total - 2) // 2
    first, last = bits[1 : 1 + half], bits[1 + half : total - 1]
    if (bits[0] + sum(first)) % 2 != 0:
        raise ValueError("even parity (leading bit) is wrong")
    if (bits[-1] + sum(last)) % 2 != 1:
        raise ValueError("odd parity (trailing bit) is wrong")
    payload = bits[1 : total - 1]
    fc = int("".join(map(str, payload[:fcb])), 2)
    cn = int("".join(map(str, payload[fcb : fcb + cnb])), 2)
    return fc, cn


def card_reads(path):
    """The panel peer's card events, in order."""
    with open(path) as f:
        for line in f:
            ev = json.loads(line)
            if ev.get("event") == "card":
                yield ev


def show(path):
    """Prints each card read decoded: format, facility code, card number (raw bits if unknown)."""
    seen = 0
    for ev in card_reads(path):
        seen += 1
        bits, data = ev.get("bits", 0), ev.get("data", "")
        fmt = next((k for k, v in FORMATS.items() if v[0] == bits), None)
        where = f"PD {ev.get('pd', '?')}"
        try:
            if fmt is None:
                raise ValueError(f"no known format has {bits} bits")
            fc, cn = decode(fmt, bits_of(data, bits))
            print(f"{where}: {fmt.upper()} ({bits} bits) facility {fc} card {cn}, parity ok")
        except ValueError as e:
            print(f"{where}: {bits} bits {data} ({e})")
    if seen == 0:
        print("(no card reads)")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--show":
        show(sys.argv[2])
        return
    path, fmt, fc, cn, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    seen = 0
    for ev in card_reads(path):
        got = decode(fmt, bits_of(ev["data"], ev["bits"]))
        if got != (fc, cn):
            sys.exit(f"wiegand_check: panel got facility/card {got}, expected {(fc, cn)}")
        seen += 1
    if seen != count:
        sys.exit(f"wiegand_check: {seen} card reads, expected {count}")
    print(f"wiegand_check: {seen} reads of {fmt} facility {fc} card {cn}, parity ok")


if __name__ == "__main__":
    main()
