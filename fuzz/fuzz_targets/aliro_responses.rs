//! Fuzz target: arbitrary R-APDUs from a "phone" into the Aliro reader core.
//! Checks: no panic, and once the core reports an error or Done it stays ended.
#![no_main]

use keyway::aliro::reader::{Action, Randomness, ReaderIdentity, ReaderTransaction, TransactionParams};
use keyway::aliro::ReaderStatus;
use libfuzzer_sys::fuzz_target;
use p256::SecretKey;

fuzz_target!(|input: &[u8]| {
    // Fixed keys: the fuzzer explores the parser, not the key space.
    let key = |b: u8| SecretKey::from_slice(&[b; 32]).expect("valid scalar");
    let identity = ReaderIdentity::new([1; 16], [2; 16], key(3));
    let rnd = Randomness { ephemeral: key(4), transaction_id: [5; 16] };
    let mut tx = ReaderTransaction::new(&identity, TransactionParams::nfc(1), rnd);
    let _select = tx.start();
    // Input: a sequence of length-prefixed responses (1-byte length).
    let mut rest = input;
    while let [len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (r, next) = tail.split_at(n);
        rest = next;
        match tx.on_response(r) {
            Ok(Action::Authenticated(_)) => {
                let _ = tx.complete(ReaderStatus::AccessGranted);
            }
            Ok(Action::Done(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
});
