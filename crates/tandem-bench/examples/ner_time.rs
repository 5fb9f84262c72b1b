//! Times the personal-data recognizer's forward pass alone, in f32 and in
//! integers: `cargo run --release -p tandem-bench --example ner_time --
//! DIR [F32|Int8]` (DIR holds `model_q4.onnx`).
use std::time::Instant;

use tandem_embed::{Precision, TokenClassifier};

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("the model's directory"));
    let only = std::env::args().nth(2);
    for precision in [Precision::F32, Precision::Int8] {
        if only
            .as_deref()
            .is_some_and(|o| o != format!("{precision:?}"))
        {
            continue;
        }
        let c = TokenClassifier::load_with(&dir, precision).expect("load");
        for n in [32usize, 128, 512] {
            let mut t = vec![];
            for rep in 0..60 {
                let ids: Vec<u32> = (0..n)
                    .map(|i| (1000 + (i * 7 + rep) % 15000) as u32)
                    .collect();
                let s = Instant::now();
                let _ = c.logits(&ids);
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
            t.sort_by(f64::total_cmp);
            println!(
                "{precision:?}, {n} tokens: p50 {:.1} ms p99 {:.1} ms",
                t[30], t[59]
            );
        }
    }
}
