//! Property test over arbitrary Unicode: every detector and the
//! redact/restore round trip are total (no panic), findings are well formed,
//! and restoring a redacted text — streamed in any chunks — gives the text
//! back.
//!
//! CI runs a short form; `PROPTEST_CASES=10000000 cargo test --release -p
//! tandem-policy --test fuzz_privacy` is the long run.

use std::sync::Arc;

use proptest::prelude::*;
use tandem_policy::privacy::{ADDRESS_LABELS, Detector, Entity, EntityRecognizer, Redaction};

/// Fragments that make detectors work hard: personal data in several
/// scripts and forms, near-misses, context words, and separators.
const FRAGMENTS: &[&str] = &[
    "john.doe@example.com",
    "123-45-6789",
    "१२३-४५-६७८९",
    "４１１１ １１１１ １１１１ １１１１",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "+49 30 901820",
    "(0161) 496 0034",
    "x6949",
    " ext. 12",
    "passport_number",
    "Reisepassnummer ist ",
    "MRN",
    "born ",
    "geb. 12.03.1985",
    "17 March 1963",
    "192.168.0.1",
    "version 10.2.0.1",
    "::1",
    "fe80::1ff:fe23:4567:890a",
    "AKIA",
    "aws_secret_access_key = ",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "My name is ",
    "à Thomas Marin",
    " de la ",
    "do Paweł Bik.",
    " a Ǆemal O'Brien-Smith",
    "an Ing. ",
    "Univ.Prof. Dr. ",
    " con Salvador Pedraza Manuel",
    "Dupont-Martin",
    "Dña. ",
    "Hauptstraße 5, 10115 Berlin",
    "ul. Wiklinowa 573, 54-964 Częstochowa",
    "683 Robert Hollow, Lopezland, IN 80162",
    "Incrocio Angelo, 9 Appartamento 2, 75013, Ferrandina (MT)",
    " Apt. 95 , ",
    "{\"name\": \"",
    "customerName=",
    "Add ",
    "Dear ",
    "Tell ",
    " and text ",
    "Give Sam",
    "call bob",
    " tell łucja",
    "send ",
    " Bob",
    ". Send ",
    "!",
    "Soria-Escudero",
    " B.A.",
    "AWS_SECRET_ACCESS_KEY=",
    "[EMAIL_1]",
    "[PERSON_",
    "]",
    "\u{200d}",
    "\u{301}",
    "🇩🇪",
    "\n",
    ", ",
    "-",
    " ",
    "٠١٢٣٤٥٦٧٨٩",
    "０１２３",
];

/// The model's labels (the address parts as the detector knows them), and
/// two it does not have.
fn labels() -> Vec<&'static str> {
    [
        &["GIVEN_NAME", "SURNAME"][..],
        ADDRESS_LABELS,
        &["PHONE", "PASSPORT", "EMAIL", "TAX_ID", "", "?"],
    ]
    .concat()
}

fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => proptest::sample::select(FRAGMENTS).prop_map(str::to_owned),
        2 => any::<String>(),
        1 => "[0-9 .,:/()+-]{1,12}",
        1 => "[A-Za-zÀ-ÿ]{1,10}",
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

type Spans = Vec<(usize, usize, usize, f32)>;

std::thread_local! {
    /// What the wild model answers for the current case.
    static ANSWER: std::cell::RefCell<Spans> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A model that answers with whatever labels and offsets the case gives it —
/// out of range, inside characters, overlapping, NaN scores.
struct Wild;

impl EntityRecognizer for Wild {
    fn recognize(&self, text: &str) -> Result<Vec<Entity>, String> {
        let n = text.len() + 3;
        let labels = labels();
        Ok(ANSWER.with_borrow(|spans| {
            spans
                .iter()
                .map(|&(l, s, e, score)| Entity {
                    label: labels[l % labels.len()].to_owned(),
                    start: s % n,
                    end: e % n,
                    score,
                })
                .collect()
        }))
    }
}

/// Detectors are built once (compiling the patterns is the slow part).
fn detectors() -> &'static [Detector; 3] {
    static D: std::sync::OnceLock<[Detector; 3]> = std::sync::OnceLock::new();
    D.get_or_init(|| {
        let plain = Detector::new(&[]).expect("built-in patterns compile");
        let modelled = || {
            Detector::new(&[])
                .expect("built-in patterns compile")
                .with_recognizer(Arc::new(Wild))
        };
        let allowing = modelled().with_allow_list(&["bob".into(), "Thomas  Marin".into()]);
        [plain, modelled(), allowing]
    })
}

fn split(text: &str, cuts: &[usize]) -> Vec<String> {
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|c| c % (text.len() + 1))
        .filter(|&c| text.is_char_boundary(c))
        .collect();
    bounds.push(0);
    bounds.push(text.len());
    bounds.sort_unstable();
    bounds.dedup();
    bounds
        .windows(2)
        .map(|w| text[w[0]..w[1]].to_owned())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        // An explicit count would override PROPTEST_CASES: read it here.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn detectors_and_round_trip_hold_on_any_text(
        t in text(),
        model in proptest::collection::vec(
            (any::<usize>(), any::<usize>(), any::<usize>(),
             prop_oneof![any::<f32>(), 0.0f32..1.0]),
            0..6,
        ),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        ANSWER.with_borrow_mut(|a| *a = model);
        for detector in detectors() {
            let found = detector.find(&t).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut last = 0;
            for f in &found {
                prop_assert!(f.start >= last && f.start < f.end && f.end <= t.len());
                prop_assert!(t.is_char_boundary(f.start) && t.is_char_boundary(f.end));
                last = f.end;
            }

            let mut r = Redaction::default();
            let redacted = r.redact(detector, &t).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if found.is_empty() {
                prop_assert_eq!(&redacted, &t);
            }
            // A text that already quotes a placeholder would get a value
            // back where it had none; everything else comes back whole.
            let quotes_placeholder = (1..=found.len() as u32).any(|n| {
                found.iter().any(|f| t.contains(&format!("[{}_{n}]", f.class.to_uppercase())))
            });
            if !quotes_placeholder {
                let mut restorer = r.restorer();
                let mut back = String::new();
                for chunk in split(&redacted, &cuts) {
                    back.push_str(&restorer.push(&chunk));
                }
                back.push_str(&restorer.finish());
                prop_assert_eq!(back, t.clone());
            }
        }
    }
}
