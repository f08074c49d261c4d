#!/usr/bin/env python3
"""OSDP Control Panel test peer built on libosdp's Python bindings (PyPI `libosdp`).

Runs a libosdp ControlPanel on a serial device or pty and reports what it sees as JSON lines
on stdout (one object per line, flushed), so a test can assert on them:

  {"event": "ready", "pds": [1, 2]}
  {"event": "online", "pd": 1, "sc": true, "id": {...}, "caps": {"LEDControl": [4, 1], ...}}
  {"event": "sc", "pd": 1, "active": true}
  {"event": "offline", "pd": 1}
  {"event": "card", "pd": 1, "reader": 0, "format": 1, "bits": 26, "data": "12345640"}
  {"event": "status", "pd": 1, "type": 0, "report": "0000"}
  {"event": "submitted", "pd": 1, "cmd": "led", "ok": true}
  {"event": "completed", "pd": 1, "command": 2, "status": 0}
  {"event": "error", "message": "..."}

Commands are read from stdin as JSON lines, for example:

  {"cmd": "led", "pd": 1, "led_number": 0, "control_code": 1, "on_color": 2, "on_count": 10}
  {"cmd": "buzzer", "pd": 1, "control_code": 2, "on_count": 1, "off_count": 1, "rep_count": 1}
  {"cmd": "output", "pd": 1, "output_no": 0, "control_code": 2, "timer_count": 0}
  {"cmd": "lstat", "pd": 1}
  {"cmd": "comset", "pd": 1, "address": 5, "baud_rate": 115200}
  {"cmd": "enable", "pd": 1} / {"cmd": "disable", "pd": 1}

Missing fields default to harmless values. Exits on stdin EOF, on {"cmd": "quit"}, or after
--duration seconds.

Usage: osdp_cp.py --port PATH --pd ADDR [--pd ADDR ...] [--baud 115200] [--duration S]
                  [--scbk HEX] [--enforce-secure] [--grant-led]

--grant-led makes it behave like a panel that grants every card: it answers each card read
with a green LED flash (which keyway reads as the panel's verdict).

--scbk gives every PD the same 16-byte SCBK (32 hex digits): the CP then starts a secure
channel with any PD that advertises it, falling back to SCBK-D + KEYSET of this key for a PD
in install mode (libosdp's own behaviour). --enforce-secure sets libosdp's EnforceSecure flag.
"""

import argparse
import json
import os
import queue
import sys
import termios
import threading
import time
import tty

try:
    import osdp
    from osdp import (
        Capability,
        Channel,
        Command,
        ControlPanel,
        Event,
        LibFlag,
        LogLevel,
        PDInfo,
        StatusReportType,
    )
except ImportError as exc:  # the Rust test turns this into a clear failure message
    print(json.dumps({"event": "error", "message": f"libosdp not importable: {exc}"}), flush=True)
    sys.exit(3)

_print_lock = threading.Lock()


def emit(obj):
    with _print_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


BAUD = {
    9600: termios.B9600,
    19200: termios.B19200,
    38400: termios.B38400,
    57600: termios.B57600,
    115200: termios.B115200,
    230400: termios.B230400,
}


class PtyChannel(Channel):
    """A non-blocking raw serial/pty file descriptor as a libosdp channel."""

    def __init__(self, path, baud):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        attrs = termios.tcgetattr(self.fd)
        speed = BAUD.get(baud, termios.B115200)
        attrs[4] = speed
        attrs[5] = speed
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    def read(self, max_bytes):
        try:
            return os.read(self.fd, max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            return b""

    def write(self, buf):
        try:
            return os.write(self.fd, bytes(buf))
        except (BlockingIOError, InterruptedError):
            return 0

    def flush(self):
        pass

    def close(self):
        os.close(self.fd)


CAP_NAMES = {
    "OutputControl": Capability.OutputControl,
    "CardDataFormat": Capability.CardDataFormat,
    "LEDControl": Capability.LEDControl,
    "AudibleControl": Capability.AudibleControl,
    "TextOutput": Capability.TextOutput,
    "CheckCharacter": Capability.CheckCharacter,
    "CommunicationSecurity": Capability.CommunicationSecurity,
    "ReceiveBufferSize": Capability.ReceiveBufferSize,
    "Readers": Capability.Readers,
}


def build_command(req):
    kind = req.get("cmd")
    if kind == "led":
        temporary = bool(req.get("temporary", False))
        cmd = {
            "command": Command.LED,
            "reader": int(req.get("reader", 0)),
            "led_number": int(req.get("led_number", 0)),
            "temporary": temporary,
            "control_code": int(req.get("control_code", 1)),
            "on_count": int(req.get("on_count", 10)),
            "off_count": int(req.get("off_count", 0)),
            "on_color": int(req.get("on_color", 2)),
            "off_color": int(req.get("off_color", 0)),
        }
        if temporary:
            cmd["timer_count"] = int(req.get("timer_count", 10))
        return cmd
    if kind == "buzzer":
        return {
            "command": Command.Buzzer,
            "reader": int(req.get("reader", 0)),
            "control_code": int(req.get("control_code", 2)),
            "on_count": int(req.get("on_count", 1)),
            "off_count": int(req.get("off_count", 1)),
            "rep_count": int(req.get("rep_count", 1)),
        }
    if kind == "output":
        return {
            "command": Command.Output,
            "output_no": int(req.get("output_no", 0)),
            "control_code": int(req.get("control_code", 2)),
            "timer_count": int(req.get("timer_count", 0)),
        }
    if kind == "lstat":
        return {"command": Command.Status, "type": StatusReportType.Local}
    if kind == "comset":
        return {
            "command": Command.Comset,
            "address": int(req.get("address", 0)),
            "baud_rate": int(req.get("baud_rate", 115200)),
        }
    return None


def event_to_json(addr, event):
    kind = event.get("event")
    if kind == Event.CardRead:
        data = event.get("data", b"")
        return {
            "event": "card",
            "pd": addr,
            "reader": event.get("reader_no"),
            "format": event.get("format"),
            "bits": event.get("length"),
            "data": bytes(data).hex(),
        }
    if kind == Event.Status:
        return {
            "event": "status",
            "pd": addr,
            "type": event.get("type"),
            "report": bytes(event.get("report", b"")).hex(),
        }
    return {"event": "other", "pd": addr, "raw": repr(event)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", required=True)
    ap.add_argument("--pd", type=int, action="append", required=True)
    ap.add_argument("--baud", type=int, default=115200)
    ap.add_argument("--duration", type=float, default=0.0)
    ap.add_argument("--log-level", default="Warning")
    ap.add_argument("--scbk", default=None)
    ap.add_argument("--enforce-secure", action="store_true")
    ap.add_argument("--grant-led", action="store_true",
                    help="answer every card read with a green LED flash, as a panel that grants")
    args = ap.parse_args()

    channel = PtyChannel(args.port, args.baud)
    addrs = list(args.pd)

    requests = queue.Queue()

    def on_event(pd_index, event):
        addr = addrs[pd_index] if 0 <= pd_index < len(addrs) else pd_index
        ev = event_to_json(addr, event)
        emit(ev)
        if args.grant_led and ev.get("event") == "card":
            # Submitted from the main loop, not from libosdp's callback thread.
            requests.put(json.dumps({"cmd": "led", "pd": addr, "temporary": True,
                                     "control_code": 2, "on_color": 2, "on_count": 5,
                                     "off_count": 0, "timer_count": 10}))
        return 0

    def on_completion(addr, command, status):
        emit({"event": "completed", "pd": addr, "command": command.get("command"), "status": status})

    scbk = bytes.fromhex(args.scbk) if args.scbk else None
    flags = [LibFlag.EnforceSecure] if args.enforce_secure else []
    infos = [PDInfo(a, channel, scbk=scbk, flags=list(flags)) for a in addrs]
    level = getattr(LogLevel, args.log_level, LogLevel.Warning)
    cp = ControlPanel(infos, log_level=level, event_handler=on_event,
                      command_completion_handler=on_completion)
    cp.start()
    emit({"event": "ready", "pds": addrs, "libosdp": getattr(osdp, "__version__", None)})

    def stdin_reader():
        for line in sys.stdin:
            line = line.strip()
            if line:
                requests.put(line)
        requests.put(None)  # EOF

    threading.Thread(target=stdin_reader, daemon=True).start()

    online = {a: False for a in addrs}
    sc_active = {a: False for a in addrs}
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    try:
        while deadline is None or time.monotonic() < deadline:
            for a in addrs:
                now_online = cp.is_online(a)
                now_sc = cp.is_sc_active(a)
                if now_sc != sc_active[a]:
                    emit({"event": "sc", "pd": a, "active": now_sc})
                    sc_active[a] = now_sc
                if now_online and not online[a]:
                    info = {"event": "online", "pd": a, "sc": now_sc}
                    try:
                        pid = cp.get_pd_id(a)
                        info["id"] = {
                            "vendor_code": pid.vendor_code,
                            "model": pid.model,
                            "version": pid.version,
                            "serial_number": pid.serial_number,
                            "firmware_version": pid.firmware_version,
                        }
                        info["caps"] = {
                            name: list(cp.check_capability(a, c)) for name, c in CAP_NAMES.items()
                        }
                    except Exception as exc:  # report, never die on a query
                        info["query_error"] = str(exc)
                    emit(info)
                elif online[a] and not now_online:
                    emit({"event": "offline", "pd": a})
                online[a] = now_online
            try:
                line = requests.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                req = json.loads(line)
            except ValueError as exc:
                emit({"event": "error", "message": f"bad json: {exc}"})
                continue
            if req.get("cmd") == "quit":
                break
            addr = int(req.get("pd", addrs[0]))
            if req.get("cmd") in ("enable", "disable"):
                # libosdp applies these asynchronously, and enable is refused until the PD
                # is really disabled: retry briefly until the state is what was asked.
                want = req["cmd"] == "enable"
                fn = cp.enable_pd if want else cp.disable_pd
                ok = False
                give_up = time.monotonic() + 3.0
                while time.monotonic() < give_up:
                    if cp.is_pd_enabled(addr) == want:
                        ok = True
                        break
                    fn(addr)
                    time.sleep(0.05)
                emit({"event": "submitted", "pd": addr, "cmd": req["cmd"], "ok": ok})
                continue
            cmd = build_command(req)
            if cmd is None:
                emit({"event": "error", "message": f"unknown cmd {req.get('cmd')!r}"})
                continue
            ok = cp.submit_command(addr, cmd)
            emit({"event": "submitted", "pd": addr, "cmd": req.get("cmd"), "ok": bool(ok)})
    finally:
        cp.stop()
        channel.close()
        emit({"event": "exit"})


if __name__ == "__main__":
    main()
