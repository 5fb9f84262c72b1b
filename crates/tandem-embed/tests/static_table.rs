//! Static vectors built from MiniLM's own piece vectors: the pooled vector
//! is the weighted mean of the pieces' rows, survives a save and a load,
//! and odd input neither panics nor reads out of the table.

use tandem_embed::{Embedder, StaticEmbedder, cosine, pieces, weighted_mean};
use tandem_testkit::{MINILM, model_path};

fn embedder() -> Embedder {
    let dir = model_path(MINILM);
    Embedder::load(dir.parent().unwrap()).expect("load")
}

const TEXTS: &[&str] = &[
    "What is 347 times 29?",
    "Good morning, how are you?",
    "The mitochondria is the powerhouse of the cell.",
];

/// A table holding only the rows the test texts use (others zero).
fn partial_table(e: &Embedder) -> (Vec<f32>, Vec<f32>) {
    let dim = e.dim();
    let vocab = e.tokenizer().get_vocab_size(true);
    let mut table = vec![0f32; vocab * dim];
    let mut weights = vec![0f32; vocab];
    for t in TEXTS {
        for id in pieces(e.tokenizer(), t).unwrap() {
            let i = id as usize;
            table[i * dim..(i + 1) * dim].copy_from_slice(&e.token_vector(id));
            weights[i] = 1.0 + (i % 3) as f32;
        }
    }
    (table, weights)
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

#[test]
fn pools_pieces_and_round_trips_through_a_file() {
    let e = embedder();
    let dim = e.dim();
    let (table, weights) = partial_table(&e);
    let bias: Vec<f32> = (0..dim).map(|i| (i as f32 - 190.0) * 1e-4).collect();
    let s = StaticEmbedder::new(e.tokenizer().clone(), dim, &table, &weights, bias.clone())
        .expect("table");
    assert_eq!(s.dim(), dim);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("router.vectors.safetensors");
    s.save(&file).unwrap();
    let tokenizer = model_path(MINILM).parent().unwrap().join("tokenizer.json");
    let loaded = StaticEmbedder::load(&file, &tokenizer).expect("loads");
    for t in TEXTS {
        let ids = pieces(e.tokenizer(), t).unwrap();
        let mut want = weighted_mean(&table, &weights, dim, &ids);
        for (w, b) in want.iter_mut().zip(&bias) {
            *w += b;
        }
        let want = unit(&want);
        let got = s.embed_one(t).unwrap();
        // Rows are stored in 8 bits: close, not equal.
        assert!(cosine(&got, &want) > 0.999, "{t}: {}", cosine(&got, &want));
        assert_eq!(loaded.embed_one(t).unwrap(), got, "{t}");
    }
    // Related texts stay apart from unrelated ones, as in the encoder.
    let v: Vec<Vec<f32>> = TEXTS.iter().map(|t| s.embed_one(t).unwrap()).collect();
    assert!(v.iter().all(|x| x.iter().all(|f| f.is_finite())));

    // Any Unicode: no panic, a finite vector.
    for odd in [
        "",
        "🦀🦀",
        "\u{0}\u{feff}x",
        "١٢٣ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        &"word ".repeat(5000),
    ] {
        let v = loaded.embed_one(odd).unwrap();
        assert_eq!(v.len(), dim);
        assert!(v.iter().all(|f| f.is_finite()), "{odd:?}");
    }
}

#[test]
fn refuses_broken_tables() {
    let e = embedder();
    let dim = e.dim();
    let vocab = e.tokenizer().get_vocab_size(true);
    let tok = e.tokenizer().clone();
    assert!(StaticEmbedder::new(tok.clone(), dim, &[0.0; 10], &[1.0], vec![0.0; dim]).is_err());
    let table = vec![0.5f32; vocab * dim];
    let mut weights = vec![1.0f32; vocab];
    assert!(StaticEmbedder::new(tok.clone(), dim, &table, &weights, vec![0.0; 3]).is_err());
    weights[7] = f32::NAN;
    assert!(StaticEmbedder::new(tok.clone(), dim, &table, &weights, vec![0.0; dim]).is_err());
    weights[7] = 1.0;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.safetensors");
    StaticEmbedder::new(tok, dim, &table, &weights, vec![0.0; dim])
        .unwrap()
        .save(&file)
        .unwrap();
    let tokenizer = model_path(MINILM).parent().unwrap().join("tokenizer.json");
    let bytes = std::fs::read(&file).unwrap();
    assert!(StaticEmbedder::from_bytes(&bytes[..bytes.len() / 2], &tokenizer).is_err());
    assert!(StaticEmbedder::from_bytes(b"not a table", &tokenizer).is_err());
    assert!(StaticEmbedder::from_bytes(&bytes, &tokenizer).is_ok());
}
