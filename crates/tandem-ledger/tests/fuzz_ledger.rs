//! Property test of the ledger reader over arbitrary bytes and over real
//! ledgers with bytes flipped, inserted and removed: reading and verifying
//! never panic, and a changed ledger verifies only if it still reads as the
//! very same entries (a change to whitespace between lines, say).
//!
//! CI runs a short form; `PROPTEST_CASES=10000000 cargo test --release -p
//! tandem-ledger --test fuzz_ledger` is the long run.

use std::sync::OnceLock;

use proptest::prelude::*;
use tandem_ledger::{Egress, Entry, Ledger, LedgerKey, parse_bytes, verify_entries};

fn key() -> LedgerKey {
    LedgerKey::from_secret([42; 32])
}

/// A real ledger of a few entries, as bytes.
fn ledger() -> &'static (Vec<u8>, Vec<Entry>) {
    static L: OnceLock<(Vec<u8>, Vec<Entry>)> = OnceLock::new();
    L.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ledger.jsonl");
        let l = Ledger::open(&path, key()).expect("open");
        for i in 0..4u32 {
            l.record(Egress {
                request_id: format!("req-{i}"),
                upstream: "cloud".into(),
                model: "m".into(),
                payload_sha256: "ab".repeat(32),
                bytes_out: 100 + u64::from(i),
                redacted: [("person".to_string(), i)].into_iter().collect(),
                outcome: if i % 2 == 0 { "sending" } else { "ok" }.into(),
                cost_usd: 0.001 * f64::from(i),
                key: (i == 3).then(|| "app ✓".to_owned()),
                ..Egress::default()
            });
        }
        assert!(l.flush());
        let bytes = std::fs::read(&path).expect("read");
        let entries = parse_bytes(&bytes).expect("parse");
        (bytes, entries)
    })
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        any::<usize>().prop_map(Edit::Remove),
    ]
}

fn cases() -> u32 {
    // An explicit count would override PROPTEST_CASES: read it here.
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_read_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(entries) = parse_bytes(&bytes) {
            let _ = verify_entries(&entries, &key(), None);
        }
    }

    #[test]
    fn a_changed_ledger_verifies_only_if_it_reads_the_same(edits in proptest::collection::vec(edit(), 1..4)) {
        let (original, entries) = ledger();
        let mut bytes = original.clone();
        for e in edits {
            let n = bytes.len().max(1);
            match e {
                Edit::Flip(p, b) => {
                    if let Some(x) = bytes.get_mut(p % n) {
                        *x ^= b | 1;
                    }
                }
                Edit::Insert(p, b) => bytes.insert(p % (bytes.len() + 1), b),
                Edit::Remove(p) => {
                    if !bytes.is_empty() {
                        bytes.remove(p % n);
                    }
                }
            }
        }
        if let Ok(read) = parse_bytes(&bytes)
            && verify_entries(&read, &key(), None).is_ok()
        {
            // Verified after a change: only a harmless one (a blank line,
            // JSON whitespace, a dropped tail) may pass; nothing read differs.
            prop_assert!(read.len() <= entries.len());
            prop_assert_eq!(&read[..], &entries[..read.len()]);
        }
    }
}
