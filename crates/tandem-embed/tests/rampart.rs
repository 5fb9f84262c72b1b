//! The personal-data recognizer against onnxruntime's logits for the same
//! file (`shared/data/privacy/rampart-reference.json`, copied into
//! `fixtures/`): same word pieces, same logits to float precision, same
//! labels.

use serde::Deserialize;
use tandem_embed::{Precision, TokenClassifier};
use tandem_testkit::{RAMPART, model_path};

#[derive(Deserialize)]
struct Reference {
    sentences: Vec<Sentence>,
}

#[derive(Deserialize)]
struct Sentence {
    text: String,
    input_ids: Vec<u32>,
    labels: Vec<String>,
    logits: Vec<Vec<f32>>,
}

/// The largest logit difference from onnxruntime over the reference
/// sentences; every word piece's label must be onnxruntime's.
fn against_onnxruntime(precision: Precision) -> f32 {
    let r: Reference =
        serde_json::from_str(include_str!("fixtures/rampart_reference.json")).unwrap();
    let dir = model_path(RAMPART);
    let c = TokenClassifier::load_with(dir.parent().unwrap(), precision).expect("load");
    let integers = tandem_embed::quant::Kernel::best() != tandem_embed::quant::Kernel::Portable;
    assert_eq!(c.quantized(), precision == Precision::Int8 && integers);
    let mut max_diff = 0f32;
    for s in &r.sentences {
        let (ids, _) = c.tokenize(&s.text).unwrap();
        let mut input = vec![s.input_ids[0]];
        input.extend(&ids);
        input.push(*s.input_ids.last().unwrap());
        assert_eq!(input, s.input_ids, "{}", s.text);
        let logits = c.logits(&input);
        let k = c.labels().len();
        for (i, (row, want)) in logits.chunks_exact(k).zip(&s.logits).enumerate() {
            for (a, b) in row.iter().zip(want) {
                max_diff = max_diff.max((a - b).abs());
            }
            let arg = row
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (j, &v)| if v > b.1 { (j, v) } else { b })
                .0;
            assert_eq!(
                c.labels()[arg],
                s.labels[i],
                "{precision:?}: {} piece {i}",
                s.text
            );
        }
    }
    eprintln!("{precision:?}: largest logit difference from onnxruntime: {max_diff:e}");
    max_diff
}

#[test]
fn matches_onnxruntime_token_for_token() {
    let diff = against_onnxruntime(Precision::F32);
    assert!(diff < 1e-3, "largest logit difference {diff}");
}

/// What `TokenClassifier::load` runs: activations rounded to 8 bits move
/// the logits a little (measured: about 0.1 on logits of magnitude 10),
/// never a label here.
#[test]
fn integer_products_keep_onnxruntime_labels() {
    let diff = against_onnxruntime(Precision::Int8);
    assert!(diff < 0.5, "largest logit difference {diff}");
}

#[test]
fn names_and_addresses_come_back_as_spans() {
    let dir = model_path(RAMPART);
    let c = TokenClassifier::load(dir.parent().unwrap()).expect("load");
    let text = "My name is Hans Müller and I live at Hauptstraße 5, 10115 Berlin.";
    let spans = c.classify(text).unwrap();
    let got: Vec<(&str, &str)> = spans
        .iter()
        .map(|s| (s.label.as_str(), &text[s.start..s.end]))
        .collect();
    for want in [
        ("GIVEN_NAME", "Hans"),
        ("SURNAME", "Müller"),
        ("STREET_NAME", "Hauptstraße"),
        ("CITY", "Berlin"),
    ] {
        assert!(got.contains(&want), "{want:?} not in {got:?}");
    }
    // A long input is read in windows and still labelled at its end.
    let long = format!(
        "{} Call Anna Schmidt tomorrow.",
        "The weather is fine. ".repeat(120)
    );
    let spans = c.classify(&long).unwrap();
    assert!(
        spans.iter().any(|s| &long[s.start..s.end] == "Schmidt"),
        "{spans:?}"
    );
}

#[test]
fn masses_sum_the_labels_of_each_group() {
    let dir = model_path(RAMPART);
    let c = TokenClassifier::load(dir.parent().unwrap()).expect("load");
    let text = "My name is Hans Müller and I live at Hauptstraße 5, 10115 Berlin.";
    let names: &[&str] = &["GIVEN_NAME", "SURNAME"];
    let pieces = c.masses(text, &[names, &["CITY"], &[]]).unwrap();
    let (ids, offsets) = c.tokenize(text).unwrap();
    assert_eq!(pieces.len(), ids.len());
    let probs = c.piece_probabilities(&ids);
    let k = c.labels().len();
    for (i, (p, &(start, end))) in pieces.iter().zip(&offsets).enumerate() {
        assert_eq!((p.start, p.end), (start, end));
        let row = &probs[i * k..(i + 1) * k];
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let named: f32 = c
            .labels()
            .iter()
            .zip(row)
            .filter(|(l, _)| names.iter().any(|n| l.ends_with(n)))
            .map(|(_, p)| p)
            .sum();
        assert!((p.mass[0] - named).abs() < 1e-5);
        assert_eq!(p.mass[2], 0.0);
    }
    let word = |w: &str| {
        let at = text.find(w).unwrap();
        pieces
            .iter()
            .find(|p| p.start == at)
            .map(|p| p.mass.clone())
            .unwrap()
    };
    assert!(word("Hans")[0] > 0.9 && word("Müller")[0] > 0.9);
    assert!(word("Berlin")[1] > 0.9 && word("Berlin")[0] < 0.1);
    assert!(word("name")[0] < 0.1);
}

#[test]
fn one_reading_gives_what_the_two_give() {
    let dir = model_path(RAMPART);
    let c = TokenClassifier::load(dir.parent().unwrap()).expect("load");
    let groups: &[&[&str]] = &[&["GIVEN_NAME", "SURNAME"], &["CITY"]];
    for text in [
        "My name is Hans Müller and I live at Hauptstraße 5, 10115 Berlin.",
        "Miłosz Mich",
        "",
    ] {
        let (spans, masses) = c.read(text, groups).unwrap();
        assert_eq!(spans, c.classify(text).unwrap(), "{text}");
        assert_eq!(masses, c.masses(text, groups).unwrap(), "{text}");
    }
}
