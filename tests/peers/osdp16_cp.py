#!/usr/bin/env python3
"""A second, independent OSDP Control Panel for interop tests: PyPI `osdp` 1.6 (osdp-python).

It asks for SCBK-D in every osdp_CHLNG and then uses the key the PD names in osdp_CCRYPT:
SCBK-D, or the SCBK it derives from its master key and the PD's cUID. keyway must give it a
session with keyway's installed key without ever accepting SCBK-D outside install mode.

This package installs a top-level module `osdp`, as libosdp's bindings do, so it lives in its
own venv (`.venv-osdp16`, made by scripts/setup).

Reports JSON lines on stdout, one object per line, flushed:

  {"event": "ready", "pd": 1}
  {"event": "sc", "pd": 1, "active": true}
  {"event": "card", "pd": 1, "reader": 0, "format": 1, "bits": 26, "data": "12345640"}
  {"event": "nak", "pd": 1, "code": 6}

Exits on stdin EOF.

Usage: osdp16_cp.py --port PATH --pd ADDR --master-key HEX
       osdp16_cp.py --derive-scbk --master-key HEX --cuid HEX   (prints the SCBK in hex)
"""

import argparse
import json
import sys
import os
import threading

try:
    import osdp
    from osdp import ControlPanel, SerialPortOsdpConnection, calculate_scbk
except ImportError as exc:  # the Rust test turns this into a clear failure message
    print(json.dumps({"event": "error", "message": f"osdp 1.6 not importable: {exc}"}), flush=True)
    sys.exit(3)

_print_lock = threading.Lock()


def emit(obj):
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


class Panel(ControlPanel):
    def on_raw_card_data_reply_received(self, address, raw):
        emit({
            "event": "card",
            "pd": address,
            "reader": raw.reader_number,
            "format": raw.format_code.value,
            "bits": raw.bit_count,
            "data": bytes(raw.data).hex(),
        })

    def on_nak_reply_received(self, address, nak):
        emit({"event": "nak", "pd": address, "code": nak.error_code.value})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port")
    ap.add_argument("--pd", type=int)
    ap.add_argument("--baud", type=int, default=115200)
    ap.add_argument("--master-key", required=True)
    ap.add_argument("--derive-scbk", action="store_true")
    ap.add_argument("--cuid")
    args = ap.parse_args()
    master = bytes.fromhex(args.master_key)

    if args.derive_scbk:
        print(calculate_scbk(master, bytes.fromhex(args.cuid)).hex(), flush=True)
        return

    if args.port is None or args.pd is None:
        ap.error("--port and --pd are required")
    panel = Panel(master_key=master)
    conn_id = panel.start_connection(SerialPortOsdpConnection(args.port, args.baud))
    panel.add_device(conn_id, args.pd, use_crc=True, use_secure_channel=True)
    emit({"event": "ready", "pd": args.pd, "osdp": getattr(osdp, "__version__", "1.6")})

    done = threading.Event()

    def stdin_reader():
        for _ in sys.stdin:
            pass
        done.set()

    threading.Thread(target=stdin_reader, daemon=True).start()
    bus = panel._buses[conn_id]
    sc = False
    try:
        while not done.wait(0.05):
            dev = bus._configured_devices.get(args.pd)
            now_sc = bool(dev is not None and dev.is_security_established)
            if now_sc != sc:
                emit({"event": "sc", "pd": args.pd, "active": now_sc})
                sc = now_sc
    finally:
        panel.shutdown()
        emit({"event": "exit"})
        # The polling thread (not a daemon) may sit in a 2 s serial read: do not wait.
        os._exit(0)


if __name__ == "__main__":
    main()
