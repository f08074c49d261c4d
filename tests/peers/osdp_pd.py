#!/usr/bin/env python3
"""libosdp's own Peripheral Device (PyPI `libosdp`) on a pty, for the side-by-side latency
benchmark (benches/osdp_latency.rs).

The stock Python wrapper refreshes the PD every 20 ms, which would measure its sleep, not
libosdp. This script instead wakes on the pty becoming readable (select) and calls libosdp's
refresh at once, so the measured time is libosdp's own reaction plus the pty wake-up, the same
conditions keyway's tokio adapter runs under.

Prints {"event": "ready"} once the PD is set up. Exits on stdin EOF.

Usage: osdp_pd.py --port PATH --addr N [--scbk HEX]
"""

import argparse
import json
import os
import select
import sys
import termios
import threading
import tty

try:
    import osdp_sys
    from osdp import Capability, Channel, LogLevel, PDCapabilities, PDInfo
except ImportError as exc:
    print(json.dumps({"event": "error", "message": f"libosdp not importable: {exc}"}), flush=True)
    sys.exit(3)


class PtyChannel(Channel):
    """A non-blocking raw pty file descriptor as a libosdp channel."""

    def __init__(self, path):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        attrs = termios.tcgetattr(self.fd)
        attrs[4] = termios.B115200
        attrs[5] = termios.B115200
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    def read(self, max_bytes):
        try:
            return os.read(self.fd, max_bytes)
        except OSError:
            return b""

    def write(self, buf):
        try:
            return os.write(self.fd, bytes(buf))
        except (BlockingIOError, InterruptedError):
            return 0

    def flush(self):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", required=True)
    ap.add_argument("--addr", type=int, default=1)
    ap.add_argument("--scbk", default=None)
    args = ap.parse_args()

    channel = PtyChannel(args.port)
    scbk = bytes.fromhex(args.scbk) if args.scbk else None
    info = PDInfo(args.addr, channel, scbk=scbk)
    caps = PDCapabilities([
        (Capability.CheckCharacter, 1, 0),
        (Capability.CommunicationSecurity, 1 if scbk else 0, 0),
        (Capability.LEDControl, 1, 1),
    ])
    osdp_sys.set_loglevel(LogLevel.Error)
    ctx = osdp_sys.PeripheralDevice(info.get(), capabilities=caps.get())
    ctx.set_command_callback(lambda cmd: (0, None))

    stop = threading.Event()

    def stdin_watch():
        for _ in sys.stdin:
            pass
        stop.set()

    threading.Thread(target=stdin_watch, daemon=True).start()
    print(json.dumps({"event": "ready"}), flush=True)
    while not stop.is_set():
        readable, _, _ = select.select([channel.fd], [], [], 0.05)
        # libosdp may need several passes for one packet (receive, decode, build, send);
        # a few extra passes cost microseconds and keep its loop from being the bottleneck.
        for _ in range(4 if readable else 1):
            ctx.refresh()


if __name__ == "__main__":
    main()
