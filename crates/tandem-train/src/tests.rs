//! Training, calibration and metrics on synthetic clusters.
use super::*;
use tandem_policy::learned::{ModelKind, TextView};

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

const WORDS: [&str; 12] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
    "kilo", "lima",
];

/// Two clusters: the "hard" one only the strong model answers.
fn fixture(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            let hard = i % 2 == 0;
            let mut v: Vec<f32> = (0..16).map(|_| rng.f32() * 0.3).collect();
            v[if hard { 0 } else { 1 }] += 1.0;
            let source = if i % 3 == 0 { "a" } else { "b" };
            Example {
                id: format!("p{i}"),
                source: source.into(),
                topic: source.into(),
                embedding: unit(&v),
                // A word of its own, so that the words alone do not tie
                // every prompt of a cluster.
                text: TextView::of(&format!(
                    "{} {}",
                    if hard {
                        "12 + 345 * 6 = ?"
                    } else {
                        "hello there"
                    },
                    WORDS[i % WORDS.len()]
                )),
                weak: !hard || rng.f32() < 0.1,
                strong: rng.f32() < 0.9,
            }
        })
        .collect()
}

#[test]
fn learns_to_separate_easy_from_hard() {
    for kind in [
        ModelKind::Knn,
        ModelKind::Ridge,
        ModelKind::Lexical,
        ModelKind::Ensemble,
        ModelKind::All,
    ] {
        let (train_set, test) = split(fixture(600, 1), 0.3, 7);
        let cfg = TrainConfig {
            kind,
            k: 16,
            ..TrainConfig::default()
        };
        let m = train(&train_set, cfg, Calibration::Quality(0.95));
        let (overall, per) = evaluate(&m, &test);
        assert!(overall.apgr > 0.7, "{kind:?}: {overall:?}");
        assert!(overall.apgr > overall.random_apgr + 0.15);
        assert!(overall.local_share_at_95 > 0.35, "{kind:?}: {overall:?}");
        assert_eq!(per.len(), 2);
        let hard = unit(&[
            1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
        ]);
        let easy = unit(&[
            0.1, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
        ]);
        let (fh, fe) = (
            TextView::of("12 + 345 * 6 = ?"),
            TextView::of("hello there"),
        );
        assert!(m.score(&hard, &fh) > m.score(&easy, &fe), "{kind:?}");
        // Saved and loaded, it scores the same.
        let back: RouterModel = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert!((back.score(&hard, &fh) - m.score(&hard, &fh)).abs() < 1e-6);
    }
}

#[test]
fn calibration_hits_its_cloud_share() {
    let data = fixture(500, 3);
    let m = train(&data, TrainConfig::default(), Calibration::CloudShare(0.3));
    let held = fixture(400, 9);
    let out = held
        .iter()
        .filter(|e| m.score(&e.embedding, &e.text) >= m.threshold)
        .count();
    let share = out as f32 / held.len() as f32;
    assert!((share - 0.3).abs() < 0.1, "cloud share {share}");
}

#[test]
fn metrics_of_perfect_and_reversed_orderings() {
    let data = fixture(200, 5);
    let gains: Vec<f32> = data.iter().map(Example::gain).collect();
    let outcomes: Vec<Outcome> = data.iter().map(Example::outcome).collect();
    let best = metrics(&gains, &outcomes);
    let worst = metrics(&gains.iter().map(|g| -g).collect::<Vec<_>>(), &outcomes);
    assert!(best.apgr > 0.9 && worst.apgr < 0.3, "{best:?} {worst:?}");
    assert!((best.random_apgr - 0.5).abs() < 0.1);
    assert!(best.cpt50 < worst.cpt50);
}

#[test]
fn base64_round_trip() {
    let v: Vec<i8> = (-128..=127).chain([0, 1]).collect();
    let n = Neighbours {
        dim: 1,
        vectors: v.clone(),
        gains: vec![0.0; v.len()],
    };
    let back: Neighbours = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
    assert_eq!(back.vectors, v);
}

#[test]
fn a_linear_map_is_recovered_from_its_outputs() {
    let mut rng = fastrand::Rng::with_seed(3);
    let (d, m) = (6, 4);
    let w: Vec<f32> = (0..d * m).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let b: Vec<f32> = (0..m).map(|_| rng.f32()).collect();
    let x: Vec<Vec<f32>> = (0..200)
        .map(|_| (0..d).map(|_| rng.f32() * 2.0 - 1.0).collect())
        .collect();
    let y: Vec<Vec<f32>> = x
        .iter()
        .map(|xi| {
            (0..m)
                .map(|o| b[o] + (0..d).map(|i| w[o * d + i] * xi[i]).sum::<f32>())
                .collect()
        })
        .collect();
    let map = fit_linear_map(&x, &y, 1e-9).expect("fits");
    for (got, want) in map.weights.iter().zip(&w) {
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
    for (got, want) in map.bias.iter().zip(&b) {
        assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    }
    // Folding: the map of a row without its bias.
    let lin = map.linear(&x[0]);
    for (o, v) in lin.iter().enumerate() {
        assert!((v + map.bias[o] - y[0][o]).abs() < 1e-3);
    }
    // Nothing to fit, or mismatched counts: no map rather than a panic.
    assert!(fit_linear_map(&[], &[], 1.0).is_none());
    assert!(fit_linear_map(&x, &y[..10], 1.0).is_none());
}

#[test]
fn frequent_pieces_weigh_less() {
    let w = sif_weights(&[0, 1, 1_000_000], 1e-3);
    assert_eq!(w[0], 1.0);
    assert!(w[1] > 0.9 && w[2] < 0.01, "{w:?}");
    assert_eq!(sif_weights(&[0, 0], 1e-3), vec![1.0, 1.0]);
}

/// Prompts of two kinds the router never saw: the memory of earlier
/// outcomes learns them as traffic goes by; the router alone cannot.
#[test]
fn a_memory_of_outcomes_learns_what_the_router_never_saw() {
    let m = train(
        &fixture(400, 1),
        TrainConfig {
            kind: ModelKind::Knn,
            k: 16,
            ..TrainConfig::default()
        },
        Calibration::Quality(0.95),
    );
    let mut rng = fastrand::Rng::with_seed(11);
    let traffic: Vec<Example> = (0..300)
        .map(|i| {
            let hard = rng.bool();
            let mut v: Vec<f32> = (0..16).map(|_| rng.f32() * 0.1).collect();
            v[if hard { 2 } else { 3 }] += 1.0;
            Example {
                id: format!("t{i}"),
                source: "traffic".into(),
                topic: "traffic".into(),
                embedding: unit(&v),
                text: TextView::of("what about this one"),
                weak: !hard,
                strong: true,
            }
        })
        .collect();
    let cfg = tandem_policy::memory::MemoryConfig::default();
    let (alone, with) = evaluate_online(&m, &traffic, &cfg);
    assert_eq!(alone.prompts, 300);
    assert!(with.apgr > alone.apgr + 0.1, "{alone:?} {with:?}");
    assert!(with.local_share_at_95 > alone.local_share_at_95 + 0.2);
    // Nothing learned when nothing is close enough to count.
    let far = tandem_policy::memory::MemoryConfig {
        similarity: 1.01,
        ..cfg
    };
    let (a, w) = evaluate_online(&m, &traffic, &far);
    assert!((a.apgr - w.apgr).abs() < 1e-9);
}

/// Prompts whose vectors and lengths say nothing and whose words say
/// everything: one word ("not" for "now") makes them hard.
#[test]
fn the_lexical_ridge_reads_what_the_vectors_blur() {
    let mut rng = fastrand::Rng::with_seed(5);
    let subjects = ["prime", "planet", "mammal", "metal", "noble gas", "vowel"];
    let data: Vec<Example> = (0..800)
        .map(|i| {
            let hard = i % 3 == 0;
            let subject = subjects[rng.usize(..subjects.len())];
            let text = if hard {
                format!(
                    "Which of these is NOT a {subject}? Option {}",
                    rng.u32(..1000)
                )
            } else {
                format!(
                    "Which of these is now a {subject}? Option {}",
                    rng.u32(..1000)
                )
            };
            let v: Vec<f32> = (0..16).map(|_| rng.f32()).collect();
            Example {
                id: format!("q{i}"),
                source: "quiz".into(),
                topic: "quiz".into(),
                embedding: unit(&v),
                text: TextView::of(&text),
                weak: !hard,
                strong: true,
            }
        })
        .collect();
    let (train_set, test) = split(data, 0.3, 3);
    let fit = |kind| {
        let cfg = TrainConfig {
            kind,
            lexical_from: 0,
            ..TrainConfig::default()
        };
        evaluate(&train(&train_set, cfg, Calibration::Quality(0.95)), &test).0
    };
    // A third are hard: a perfect order recovers the gap at 1/3 sent out,
    // an APGR of about 0.84.
    let lexical = fit(ModelKind::Lexical);
    assert!(lexical.apgr > 0.82, "{lexical:?}");
    assert!(lexical.local_share_at_95 > 0.6, "{lexical:?}");
    let ridge = fit(ModelKind::Ridge);
    assert!(ridge.apgr < 0.62, "{ridge:?}");
    // The combination keeps most of what the words tell.
    let all = fit(ModelKind::All);
    assert!(all.apgr > 0.75, "{all:?}");
}

#[test]
fn conjugate_gradient_solves_a_small_system() {
    // [[4, 1], [1, 3]] x = [1, 2] → x = [1/11, 7/11].
    let a = |v: &[f64]| vec![4.0 * v[0] + v[1], v[0] + 3.0 * v[1]];
    let x = conjugate_gradient(a, &[1.0, 2.0], 1e-12, 10);
    assert!((x[0] - 1.0 / 11.0).abs() < 1e-9 && (x[1] - 7.0 / 11.0).abs() < 1e-9);
}

/// Prompts alike in vectors and words whose difficulty only the local
/// model's reading shows (one direction of it, among numbers of very
/// different scales).
fn read_fixture(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|i| {
            let hard = rng.bool();
            let v: Vec<f32> = (0..16).map(|_| rng.f32()).collect();
            let mut reading: Vec<f32> = (0..24)
                .map(|d| (rng.f32() - 0.5) * if d % 3 == 0 { 500.0 } else { 1.0 })
                .collect();
            reading[5] += if hard { 0.8 } else { -0.8 };
            Example {
                id: format!("r{i}"),
                source: "a".into(),
                topic: "a".into(),
                embedding: unit(&v),
                text: TextView {
                    reading: Some(reading),
                    ..TextView::of(&format!("question {}", WORDS[i % WORDS.len()]))
                },
                weak: !hard,
                strong: true,
            }
        })
        .collect()
}

#[test]
fn the_probe_reads_what_the_text_does_not_show() {
    let (mut train_set, test) = split(read_fixture(900, 3), 0.3, 7);
    // Some training prompts were never read: the probe is fitted on the
    // others, the scale of unread requests on all of them.
    for e in train_set.iter_mut().step_by(4) {
        e.text.reading = None;
    }
    // The other parts see noise here: the probe counts for more than
    // all of them.
    let cfg = TrainConfig {
        kind: ModelKind::Ensemble,
        probe_weight: 4.0,
        probe_lambda: 10.0,
        ..TrainConfig::default()
    };
    let without: Vec<Example> = train_set
        .iter()
        .cloned()
        .map(|mut e| {
            e.text.reading = None;
            e
        })
        .collect();
    let blind = train(&without, cfg.clone(), Calibration::Quality(0.95));
    assert!(blind.probe.is_none() && blind.cdf_unread.is_empty());
    let (b, _) = evaluate(&blind, &test);

    let m = train(&train_set, cfg.clone(), Calibration::Quality(0.95));
    let probe = m.probe.as_ref().expect("a probe");
    assert_eq!(probe.weights.len(), 24);
    // The intercept goes unpenalised and the standardisation is folded into
    // the weights: at the mean reading the probe predicts the mean gain.
    let read: Vec<&Example> = train_set
        .iter()
        .filter(|e| e.text.reading.is_some())
        .collect();
    let mut centre = [0f64; 24];
    for e in &read {
        for (c, &v) in centre
            .iter_mut()
            .zip(e.text.reading.as_deref().unwrap_or_default())
        {
            *c += f64::from(v) / read.len() as f64;
        }
    }
    let centre: Vec<f32> = centre.iter().map(|&c| c as f32).collect();
    let mean_gain = read.iter().map(|e| e.gain()).sum::<f32>() / read.len() as f32;
    let at_centre = probe.score(&centre).expect("the probe's width");
    assert!(
        (at_centre - mean_gain).abs() < 1e-2,
        "{at_centre} vs {mean_gain}"
    );
    assert_eq!(m.cdf.len(), train_set.len() - train_set.len().div_ceil(4));
    assert_eq!(m.cdf_unread.len(), train_set.len());
    // Reading only where a reading can move the decision. The probe is
    // most of the score here, so readings move difficulties far: nearly
    // every prompt is worth reading, and nearly every decision is the one
    // reading all of them makes.
    let p = m.probe.as_ref().expect("a probe");
    assert!(p.reach > 0.0 && p.reach < 1.0, "{}", p.reach);
    let band = band_report(&m, &test, None).expect("read prompts");
    assert_eq!(band.prompts, test.len());
    assert!(band.agree >= 0.95, "{band:?}");
    // Under a held cloud share the band is around the held cut, and as
    // good there: it lets that share out, as reading all does.
    for share in HELD_SHARES {
        let held = band_report(&m, &test, Some(share)).expect("read prompts");
        assert_eq!(held.share, Some(share));
        assert!(held.agree >= 0.95, "{held:?}");
        assert!(
            held.cloud[0] <= share + 1e-9 && held.cloud[0] >= share - 0.15,
            "{held:?}"
        );
        assert!(held.threshold != band.threshold, "{held:?}");
    }
    // A narrower band reads fewer, and what it reads still helps.
    let narrow = train(
        &train_set,
        TrainConfig {
            read_band: 0.3,
            ..cfg.clone()
        },
        Calibration::Quality(0.95),
    );
    let nb = band_report(&narrow, &test, None).expect("read prompts");
    assert!(nb.read < 0.9 && nb.agree >= 0.5, "{nb:?}");
    assert!(nb.accuracy[1] > nb.accuracy[2], "{nb:?}");
    let always = train(
        &train_set,
        TrainConfig {
            read_band: 1.0,
            ..cfg.clone()
        },
        Calibration::Quality(0.95),
    );
    assert_eq!(always.probe.as_ref().map(|p| p.reach), Some(1.0));
    let all = band_report(&always, &test, None).expect("read prompts");
    assert!(all.read == 1.0 && all.agree == 1.0, "{all:?}");
    assert!(band_report(&blind, &test, None).is_none());

    let (r, _) = evaluate(&m, &test);
    // Half the prompts are hard: a perfect ordering scores about 0.73.
    assert!(r.apgr > 0.65 && r.apgr > b.apgr + 0.15, "{r:?} vs {b:?}");
    assert!(r.local_share_at_95 > 0.3, "{r:?}");

    // A request without a reading (or with one of another model's width)
    // is scored by the other parts on their own scale, as the blind
    // router would score it.
    let unread: Vec<Example> = test
        .iter()
        .cloned()
        .map(|mut e| {
            e.text.reading = None;
            e
        })
        .collect();
    let (u, _) = evaluate(&m, &unread);
    assert!((u.apgr - b.apgr).abs() < 0.1, "{u:?} vs {b:?}");
    let e = &test[0];
    let mut other = e.text.clone();
    other.reading = Some(vec![1.0; 7]);
    let mut none = e.text.clone();
    none.reading = None;
    assert_eq!(m.score(&e.embedding, &other), m.score(&e.embedding, &none));
    for s in [m.score(&e.embedding, &e.text), m.score(&e.embedding, &none)] {
        assert!((0.0..=1.0).contains(&s));
    }

    // Saved and loaded, it scores the same.
    let back: RouterModel = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    for e in &test {
        assert_eq!(
            m.score(&e.embedding, &e.text),
            back.score(&e.embedding, &e.text)
        );
    }

    // A probe of the earlier form (weights on standardised readings, with
    // their mean and deviation) is refused rather than misread.
    let mut old = serde_json::to_value(probe).unwrap();
    old["mean"] = serde_json::json!("AAAAAA==");
    assert!(serde_json::from_value::<tandem_policy::learned::Probe>(old).is_err());

    // Too few readings: no probe.
    let few: Vec<Example> = train_set
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, mut e)| {
            if i >= PROBE_MIN_PROMPTS / 2 {
                e.text.reading = None;
            }
            e
        })
        .collect();
    assert!(train(&few, cfg, Calibration::Quality(0.95)).probe.is_none());
}
