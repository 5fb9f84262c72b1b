use std::time::Instant;
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let c = tandem_embed::TokenClassifier::load(&dir).unwrap();
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
        println!("{n} tokens: p50 {:.1} ms p99 {:.1} ms", t[30], t[59]);
    }
}
