//! The Rust embedder against vectors from the reference implementation
//! (sentence-transformers on torch; see the fixture's `reference` field).

use serde::Deserialize;
use tandem_embed::{Embedder, cosine};
use tandem_testkit::{MINILM, model_path};

#[derive(Deserialize)]
struct Fixture {
    sentences: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

fn embedder() -> Embedder {
    let dir = model_path(MINILM);
    Embedder::load(dir.parent().unwrap()).expect("load")
}

#[test]
fn matches_the_reference_model() {
    let f: Fixture = serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    let e = embedder();
    assert_eq!(e.dim(), 384);
    // One at a time, and all together (padding must not change anything).
    let texts: Vec<&str> = f.sentences.iter().map(String::as_str).collect();
    let batch = e.embed(&texts).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let one = e.embed_one(text).unwrap();
        let c = cosine(&one, &f.vectors[i]);
        assert!(c >= 0.999, "sentence {i}: cosine {c}");
        let cb = cosine(&batch[i], &f.vectors[i]);
        assert!(cb >= 0.999, "sentence {i} in a batch: cosine {cb}");
        let norm: f32 = one.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    // Related sentences are close, unrelated ones are not.
    assert!(cosine(&batch[0], &batch[1]) > 0.5);
    assert!(cosine(&batch[0], &batch[2]) < 0.3);
}
