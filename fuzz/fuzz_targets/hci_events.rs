//! Fuzz target: arbitrary packets from a raw HCI socket into the Read RSSI reply parser.
//! Checks: no panic; an answer is only ever taken for the handle that was asked about.
#![no_main]

use keyway::ble::hci::{parse_rssi_reply, RssiReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let (handle, packet) = match input {
        [lo, hi, rest @ ..] => (u16::from_le_bytes([*lo, *hi]), rest),
        _ => return,
    };
    if let Some(RssiReply::Rssi(_)) = parse_rssi_reply(packet, handle) {
        // A successful reply always echoes the handle it answers.
        let echoed = packet
            .get(7..9)
            .map(|h| u16::from_le_bytes([h[0], h[1]]) & 0x0FFF);
        assert_eq!(echoed, Some(handle & 0x0FFF));
    }
});
