//! `tandem bench cascade`: accuracy and cloud share of local-only,
//! cloud-only, the learned router and the cascade, on questions with a
//! checkable answer, with a local model as the weak side and a cloud-role
//! Tandem with a bigger model as the strong side.
//!
//! Each question is answered once by each side (greedy, so answers are
//! reproducible); the local answer's confidence and the router's score are
//! recorded. The cascade threshold is calibrated by two-fold
//! cross-validation — chosen on one half, scored on the other — so the
//! table does not flatter it. With a router trained on the pair's own
//! labels, the router and the early cascade are also held to a cloud
//! budget (`--cloud-budget`): one rule mixes the router's score and the
//! answer's confidence, cut where the budget says, and only the mix is
//! chosen by labels. Finally the cascade runs live through the dispatcher
//! with the settings calibrated on all questions — under the budget when
//! there is an own router, alone otherwise — which is what `[router]`
//! should be set to.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tandem_api::{Answer, Backend, GenerateRequest, LogprobRequest};
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_engine::EngineOptions;
use tandem_policy::learned::{LearnedScorer, ModelKind, TextView, TrainConfig};
use tandem_policy::{PolicyConfig, Scorer, share};
use tandem_router::label::{Item, Labeler, Outcome, Reference, greedy_request};
use tandem_router::learned::RouterInput;
use tandem_router::{Dispatcher, RequestContext, confidence};
use tandem_train::{Calibration, Example};

use crate::chart::Series;
use crate::process::{spawn, wait_healthy};
use crate::setup::{load_embedder, load_engine, load_router};

/// `tandem bench cascade`'s options.
#[derive(Args)]
pub struct CascadeArgs {
    /// The weak (local) model.
    #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
    pub weak: String,
    /// The strong model, served by a cloud-role Tandem this command starts.
    #[arg(long, default_value = "qwen2.5-coder-1.5b-instruct")]
    pub strong: String,
    /// Questions asked.
    #[arg(long, default_value_t = 40)]
    pub questions: usize,
    /// Port of the cloud-role Tandem it starts.
    #[arg(long, default_value_t = 8093)]
    pub cloud_port: u16,
    /// Target: this share of the cloud model's accuracy, with as few
    /// escalations as reach it.
    #[arg(long, default_value_t = 0.95)]
    pub quality: f64,
    /// Cloud budget: the share of requests the own router and the early
    /// cascade together may send out, as `--quality` asks for the least
    /// share that reaches a quality. What it costs in accuracy is reported.
    #[arg(long, default_value_t = 0.5)]
    pub cloud_budget: f64,
    /// Under the cloud budget, the most device time an escalated request
    /// may cost, as a share of what the full cascade's escalations cost.
    #[arg(long, default_value_t = 0.25)]
    pub device_cap: f64,
    /// Seed of the generated questions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Tokens after which the early cascade judges the local answer.
    #[arg(long, default_value_t = 8)]
    pub early_tokens: usize,
    /// Questions (never asked by the table) labelled by this pair to train
    /// a router of its own; 0 skips it.
    #[arg(long, default_value_t = 160)]
    pub train_questions: usize,
    /// Tokens each answer may have. Most questions ask for the bare number
    /// or letter; on the longer word problems both models tend to reason
    /// first, and a small cap cuts them off before their answer.
    #[arg(long, default_value_t = 24)]
    pub max_tokens: u32,
    /// Report on the figures a run saved (its `.rows.json`) instead of
    /// asking the models again (the shared router's row and the live pass
    /// are left out).
    #[arg(long)]
    pub rows: Option<std::path::PathBuf>,
    /// Where the chart of accuracy against cloud share is written (PNG).
    #[arg(long, default_value = "cascade.png")]
    pub chart: std::path::PathBuf,
    /// Write the questions as prompt files instead of running — the ones
    /// the router is trained on (`train.jsonl`, `--train-questions` of
    /// them) and the ones the table asks (`asked.jsonl`, `--questions`),
    /// each line `{"id", "prompt", "answer"}` as `tandem router label`
    /// reads them — to take a pair through label, train and serve by hand.
    #[arg(long, value_name = "DIR")]
    pub write_questions: Option<std::path::PathBuf>,
}

/// A question and how to check an answer.
struct Question {
    prompt: String,
    answer: Reference,
}

const MCQ: &[(&str, char)] = &[
    (
        "Which planet is known as the Red Planet?\nA) Venus\nB) Mars\nC) Jupiter\nD) Saturn",
        'B',
    ),
    (
        "What is the chemical symbol for gold?\nA) Ag\nB) Gd\nC) Au\nD) Go",
        'C',
    ),
    (
        "Which data structure works last-in, first-out?\nA) Queue\nB) Heap\nC) Linked list\nD) Stack",
        'D',
    ),
    (
        "What is the time complexity of binary search on a sorted array?\nA) O(log n)\nB) O(n)\nC) O(n log n)\nD) O(1)",
        'A',
    ),
    (
        "Which gas do plants absorb from the air for photosynthesis?\nA) Oxygen\nB) Nitrogen\nC) Carbon dioxide\nD) Helium",
        'C',
    ),
    (
        "Who wrote 'Pride and Prejudice'?\nA) Jane Austen\nB) Charles Dickens\nC) Mark Twain\nD) Leo Tolstoy",
        'A',
    ),
    (
        "In Python, which keyword defines a function?\nA) func\nB) def\nC) function\nD) lambda",
        'B',
    ),
    (
        "What is the boiling point of water at sea level in Celsius?\nA) 90\nB) 50\nC) 100\nD) 212",
        'C',
    ),
    (
        "Which HTTP status code means 'Not Found'?\nA) 200\nB) 301\nC) 500\nD) 404",
        'D',
    ),
    (
        "Which organ pumps blood through the human body?\nA) Heart\nB) Liver\nC) Lung\nD) Kidney",
        'A',
    ),
];

/// Multiple-choice questions for the router's own labels, none of them
/// asked by the table (`MCQ`).
const MCQ_TRAIN: &[(&str, char)] = &[
    (
        "What is the largest ocean on Earth?\nA) Atlantic\nB) Indian\nC) Pacific\nD) Arctic",
        'C',
    ),
    (
        "Which language is mainly used to style web pages?\nA) CSS\nB) SQL\nC) C\nD) Bash",
        'A',
    ),
    (
        "How many sides does a hexagon have?\nA) Five\nB) Six\nC) Seven\nD) Eight",
        'B',
    ),
    (
        "Which gas makes up most of Earth's atmosphere?\nA) Oxygen\nB) Argon\nC) Carbon dioxide\nD) Nitrogen",
        'D',
    ),
    (
        "What does CPU stand for?\nA) Central Processing Unit\nB) Computer Power Unit\nC) Core Program Utility\nD) Central Print Unit",
        'A',
    ),
    (
        "Which sorting algorithm has an average time complexity of O(n log n)?\nA) Bubble sort\nB) Merge sort\nC) Insertion sort\nD) Selection sort",
        'B',
    ),
    (
        "Who painted the Mona Lisa?\nA) Michelangelo\nB) Raphael\nC) Leonardo da Vinci\nD) Rembrandt",
        'C',
    ),
    (
        "What is the freezing point of water in Fahrenheit?\nA) 0\nB) 100\nC) 212\nD) 32",
        'D',
    ),
    (
        "Which HTTP method is meant to retrieve a resource without changing it?\nA) GET\nB) POST\nC) DELETE\nD) PATCH",
        'A',
    ),
    (
        "What is the capital of Japan?\nA) Kyoto\nB) Tokyo\nC) Osaka\nD) Seoul",
        'B',
    ),
    (
        "Which planet is closest to the Sun?\nA) Venus\nB) Earth\nC) Mercury\nD) Mars",
        'C',
    ),
    (
        "In Git, which command records staged changes?\nA) git push\nB) git add\nC) git fetch\nD) git commit",
        'D',
    ),
];

/// Facts the generated multiple-choice questions ask about, in three
/// families. Even entries are asked by the table, odd ones only in the
/// router's own labels, so the two never share a fact; the wrong options
/// come from the whole family, and the right one's letter is drawn.
const CAPITALS: &[(&str, &str)] = &[
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Russia", "Moscow"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Peru", "Lima"),
    ("South Korea", "Seoul"),
    ("Austria", "Vienna"),
];

const SYMBOLS: &[(&str, &str)] = &[
    ("hydrogen", "H"),
    ("helium", "He"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("oxygen", "O"),
    ("sodium", "Na"),
    ("magnesium", "Mg"),
    ("aluminium", "Al"),
    ("silicon", "Si"),
    ("phosphorus", "P"),
    ("sulfur", "S"),
    ("chlorine", "Cl"),
    ("potassium", "K"),
    ("calcium", "Ca"),
    ("iron", "Fe"),
    ("copper", "Cu"),
    ("zinc", "Zn"),
    ("silver", "Ag"),
    ("gold", "Au"),
    ("tin", "Sn"),
    ("mercury", "Hg"),
    ("lead", "Pb"),
    ("neon", "Ne"),
    ("uranium", "U"),
];

const AUTHORS: &[(&str, &str)] = &[
    ("Pride and Prejudice", "Jane Austen"),
    ("Hamlet", "William Shakespeare"),
    ("1984", "George Orwell"),
    ("Moby-Dick", "Herman Melville"),
    ("War and Peace", "Leo Tolstoy"),
    ("The Odyssey", "Homer"),
    ("Don Quixote", "Miguel de Cervantes"),
    ("Oliver Twist", "Charles Dickens"),
    ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("Frankenstein", "Mary Shelley"),
    ("Dracula", "Bram Stoker"),
    ("Crime and Punishment", "Fyodor Dostoevsky"),
    ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Adventures of Huckleberry Finn", "Mark Twain"),
    ("Les Miserables", "Victor Hugo"),
    ("The Divine Comedy", "Dante Alighieri"),
    ("Jane Eyre", "Charlotte Bronte"),
    ("To Kill a Mockingbird", "Harper Lee"),
    ("Brave New World", "Aldous Huxley"),
    ("The Hobbit", "J. R. R. Tolkien"),
    ("Faust", "Johann Wolfgang von Goethe"),
    ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"),
    ("The Catcher in the Rye", "J. D. Salinger"),
    ("Madame Bovary", "Gustave Flaubert"),
];

/// Each family's question, with `{}` for the fact's subject.
const FAMILIES: [(&str, &[(&str, &str)]); 3] = [
    ("What is the capital of {}?", CAPITALS),
    ("What is the chemical symbol for {}?", SYMBOLS),
    ("Who wrote '{}'?", AUTHORS),
];

/// Which questions a draw may use.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    /// The table's: `MCQ` and the even facts.
    Asked,
    /// The router's own labels': `MCQ_TRAIN` and the odd facts.
    Training,
}

/// The seed offset of the questions the router's own labels come from.
const TRAIN_SEED: u64 = 1_000_003;

/// Kinds of question, asked in turn.
const KINDS: usize = 8;

/// A multiple-choice question: a quarter of the draws take the next
/// hand-written one while any are left, the rest (and all after them) are
/// drawn from the facts. So a long run does not ask the same few questions
/// again and again, and the router's own labels come from the same kind of
/// question as the table's, as labels from traffic would.
fn multiple_choice(
    rng: &mut fastrand::Rng,
    part: Part,
    written: &mut std::slice::Iter<'_, (&'static str, char)>,
) -> Question {
    let ask = |q: &str, c: char| Question {
        prompt: format!("{q}\nAnswer with the letter only."),
        answer: Reference::Letter(c),
    };
    if rng.usize(0..4) == 0
        && let Some((q, c)) = written.next()
    {
        return ask(q, *c);
    }
    let (template, facts) = FAMILIES[rng.usize(0..FAMILIES.len())];
    let parity = usize::from(part == Part::Training);
    let mine: Vec<usize> = (0..facts.len()).filter(|i| i % 2 == parity).collect();
    let fact = mine[rng.usize(0..mine.len())];
    let mut others: Vec<usize> = (0..facts.len()).filter(|&i| i != fact).collect();
    rng.shuffle(&mut others);
    let mut options: Vec<&str> = others.iter().take(3).map(|&i| facts[i].1).collect();
    let right = rng.usize(0..=options.len());
    options.insert(right, facts[fact].1);
    let mut q = template.replace("{}", facts[fact].0);
    for (letter, option) in ('A'..).zip(&options) {
        q.push_str(&format!("\n{letter}) {option}"));
    }
    let letter = ('A'..).nth(right).unwrap_or('A');
    ask(&q, letter)
}

/// Arithmetic word problems from one- to three-step, and multiple-choice
/// questions: the local model gets the easy ones, not all the hard ones.
fn questions(n: usize, seed: u64, part: Part) -> Vec<Question> {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Its own stream, so the arithmetic questions of a seed stay what they
    // were before the multiple-choice ones were drawn.
    let mut choice_rng = fastrand::Rng::with_seed(seed ^ 0x6d63_715f_6472_6177);
    let mut written = match part {
        Part::Asked => MCQ,
        Part::Training => MCQ_TRAIN,
    }
    .iter();
    let mut out = Vec::with_capacity(n);
    let number = |q: String, a: i64| Question {
        prompt: format!("{q} Reply with only the final number."),
        answer: Reference::Number(a),
    };
    for i in 0..n {
        let q = match i % KINDS {
            0 => {
                let (a, b) = (rng.i64(10..100), rng.i64(10..100));
                number(format!("What is {a} + {b}?"), a + b)
            }
            1 => {
                let (a, b) = (rng.i64(12..60), rng.i64(12..60));
                number(format!("What is {a} times {b}?"), a * b)
            }
            2 => {
                let (a, b, c) = (rng.i64(20..80), rng.i64(5..40), rng.i64(3..20));
                number(
                    format!(
                        "Tom has {a} apples. He buys {b} more and then gives {c} to his sister. How many apples does Tom have now?"
                    ),
                    a + b - c,
                )
            }
            3 => {
                let (s, h) = (rng.i64(40..120), rng.i64(2..9));
                number(
                    format!(
                        "A train travels at {s} km per hour for {h} hours. How many kilometres does it travel?"
                    ),
                    s * h,
                )
            }
            4 => {
                let (p, n, m) = (rng.i64(3..15), rng.i64(4..12), rng.i64(2..6));
                number(
                    format!(
                        "Pens cost {p} dollars each. Anna buys {n} pens and Ben buys {m} times as many pens as Anna. How many dollars do they spend together?"
                    ),
                    p * n + p * n * m,
                )
            }
            5 => {
                let (x, a) = (rng.i64(5..60), rng.i64(10..90));
                number(format!("If x + {a} = {}, what is x?", x + a), x)
            }
            6 => {
                let (a, b) = (rng.i64(100..999), rng.i64(7..30));
                number(
                    format!("What is the remainder when {a} is divided by {b}?"),
                    a % b,
                )
            }
            _ => multiple_choice(&mut choice_rng, part, &mut written),
        };
        out.push(q);
    }
    out
}

fn request(model: &str, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        choices: 1,
        logprobs: Some(LogprobRequest { top: 0 }),
        ..greedy_request(model, prompt, max_tokens)
    }
}

/// What a run saves beside its chart (`.rows.json`): every question's
/// figures and the routers' thresholds, enough to report again.
#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Saved {
    /// The shared-label router's threshold, when there was one.
    router_threshold: Option<f32>,
    /// The own-label router's threshold, when it was trained.
    own_threshold: Option<f32>,
    rows: Vec<Row>,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Row {
    weak: bool,
    strong: bool,
    confidence: f32,
    difficulty: Option<f32>,
    /// The score of the router trained on this pair's own labels.
    own: Option<f32>,
    /// The local answer's token log-probabilities.
    logprobs: Vec<f32>,
    /// Seconds to the local answer's first token, and to its end.
    first_s: f64,
    total_s: f64,
}

impl Row {
    /// The early cascade's verdict: escalated after `k` tokens, at the
    /// end, or kept.
    fn early(&self, k: usize, t: f32) -> Verdict {
        if self.head(k).is_some_and(|c| c < t) {
            return Verdict::Early;
        }
        if self.confidence < t {
            Verdict::Late
        } else {
            Verdict::Kept
        }
    }

    /// The mean log-probability of the first `k` tokens, if the answer has
    /// that many (what the early look judges).
    fn head(&self, k: usize) -> Option<f32> {
        (k > 0 && self.logprobs.len() >= k)
            .then(|| self.logprobs.iter().take(k).sum::<f32>() / k as f32)
    }

    /// The lowest confidence the early cascade sees: its look at `k`
    /// tokens (when the answer has that many) or the whole answer's.
    fn early_confidence(&self, k: usize) -> f32 {
        self.head(k)
            .map_or(self.confidence, |h| h.min(self.confidence))
    }

    /// Device seconds spent until the early look at `k` tokens: the first
    /// token's time and `k − 1` tokens at this answer's decode speed.
    fn seconds_to(&self, k: usize) -> f64 {
        let n = self.logprobs.len();
        if n <= 1 || k >= n {
            return self.total_s;
        }
        let per_token = (self.total_s - self.first_s) / (n - 1) as f64;
        self.first_s + per_token * (k.max(1) - 1) as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Kept,
    Early,
    Late,
}

/// Reads an answer, timing its first token and its end.
async fn timed(mut stream: tandem_api::EventStream) -> anyhow::Result<(Answer, f64, f64)> {
    use futures::StreamExt;
    let t0 = std::time::Instant::now();
    let mut first = None;
    let mut so_far = tandem_api::AnswerSoFar::default();
    while let Some(event) = stream.next().await {
        match event? {
            tandem_api::Event::Delta(d) => {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                so_far.push(d);
            }
            tandem_api::Event::Finish(f) => {
                let total = t0.elapsed().as_secs_f64();
                return Ok((so_far.finish(f), first.unwrap_or(total), total));
            }
        }
    }
    anyhow::bail!("the local answer ended without finishing")
}

/// Accuracy when the rows flagged go to the strong model.
fn mix(rows: &[&Row], mut escalate: impl FnMut(&Row) -> bool) -> (f64, f64) {
    let n = rows.len().max(1) as f64;
    let (mut correct, mut cloud) = (0.0, 0.0);
    for r in rows {
        if escalate(r) {
            cloud += 1.0;
            correct += f64::from(u8::from(r.strong));
        } else {
            correct += f64::from(u8::from(r.weak));
        }
    }
    (correct / n, cloud / n)
}

/// Two halves for cross-validation, each with every kind of question alike:
/// whole rounds of the kinds go to one half or the other. (Alternate
/// questions would give one half the even kinds and the other the odd
/// ones, whose accuracies differ, and a threshold chosen on one half would
/// not carry over to the other.)
fn halves<'a, T>(all: &[&'a T]) -> (Vec<&'a T>, Vec<&'a T>) {
    let (a, b): (Vec<_>, Vec<_>) = all
        .iter()
        .enumerate()
        .partition(|(i, _)| (i / KINDS).is_multiple_of(2));
    let strip = |v: Vec<(usize, &&'a T)>| v.into_iter().map(|(_, r)| *r).collect();
    (strip(a), strip(b))
}

/// The highest confidence threshold that still escalates as few answers as
/// reach `quality` times the strong model's accuracy on `rows`.
fn calibrate(rows: &[&Row], quality: f64) -> f32 {
    let strong = mix(rows, |_| true).0;
    let mut cands: Vec<f32> = rows.iter().map(|r| r.confidence).collect();
    cands.push(f32::NEG_INFINITY);
    cands.sort_by(f32::total_cmp);
    cands.dedup();
    // Escalate answers with confidence below t; try from "none" upwards.
    for t in cands
        .iter()
        .map(|&c| if c.is_finite() { c + 1e-6 } else { c })
    {
        if mix(rows, |r| r.confidence < t).0 >= quality * strong - 1e-9 {
            return t;
        }
    }
    f32::INFINITY
}

/// A router trained on this pair's own labels (`tandem router label`'s
/// labeller, checked answers) for questions the table never asks.
async fn own_router(
    args: &CascadeArgs,
    local: &tandem_engine::LocalEngine,
    cloud: &CloudBackend,
    embedder: &tandem_embed::Embedder,
) -> anyhow::Result<tandem_policy::learned::RouterModel> {
    let d = Dispatcher::builder()
        .local(local.clone())
        .cloud(cloud.clone())
        .build()
        .map_err(anyhow::Error::msg)?;
    let mut labeler = Labeler::new(d, &args.weak, &args.strong);
    labeler.max_tokens = args.max_tokens;
    let qs = questions(
        args.train_questions,
        args.seed.wrapping_add(TRAIN_SEED),
        Part::Training,
    );
    let mut examples = Vec::with_capacity(qs.len());
    for (i, q) in qs.iter().enumerate() {
        let item = Item {
            prompt: q.prompt.clone(),
            reference: Some(q.answer),
        };
        let Outcome::Labeled(l) = labeler
            .label(&item)
            .await
            .map_err(|e| anyhow::anyhow!("labelling: {}", e.message))?
        else {
            continue;
        };
        examples.push(Example {
            id: format!("train-{i}"),
            source: "bench".into(),
            topic: "bench".into(),
            embedding: embedder.embed_one(&q.prompt)?,
            text: TextView::of(&q.prompt),
            weak: l.weak_correct,
            strong: l.strong_correct,
        });
        if (i + 1) % 20 == 0 {
            eprintln!("labelled {}/{} training questions", i + 1, qs.len());
        }
    }
    let weak = examples.iter().filter(|e| e.weak).count();
    let strong = examples.iter().filter(|e| e.strong).count();
    eprintln!(
        "own labels: {} questions, local right {weak}, cloud right {strong}",
        examples.len()
    );
    let config = TrainConfig {
        kind: ModelKind::All,
        k: 16,
        ..TrainConfig::default()
    };
    Ok(tandem_train::train(
        &examples,
        config,
        Calibration::Quality(args.quality as f32),
    ))
}

/// Accuracy with the top `share` of rows by `score` escalated, and what
/// random routing gets at the same share, for shares 0.1 to 0.9.
fn against_random(rows: &[&Row], score: impl Fn(&Row) -> f32) -> Vec<(f64, f64, f64)> {
    let mut sorted: Vec<&Row> = rows.to_vec();
    sorted.sort_by(|a, b| score(b).total_cmp(&score(a)));
    let n = sorted.len();
    let weak = mix(rows, |_| false).0;
    let strong = mix(rows, |_| true).0;
    (1..=9)
        .map(|tenth| {
            let m = (n * tenth + 5) / 10;
            let share = m as f64 / n.max(1) as f64;
            let correct: usize = sorted
                .iter()
                .enumerate()
                .map(|(i, r)| usize::from(if i < m { r.strong } else { r.weak }))
                .sum();
            (
                share,
                correct as f64 / n.max(1) as f64,
                (1.0 - share) * weak + share * strong,
            )
        })
        .collect()
}

/// The smallest cloud share at which escalating the rows with the highest
/// `score` reaches `quality` times the strong model's accuracy on `rows`.
fn share_for(rows: &[&Row], quality: f64, score: impl Fn(&Row) -> f32) -> f64 {
    let n = rows.len();
    if n == 0 {
        return 0.0;
    }
    let mut sorted: Vec<&Row> = rows.to_vec();
    sorted.sort_by(|a, b| score(b).total_cmp(&score(a)));
    let target = quality * mix(rows, |_| true).0 * n as f64 - 1e-9;
    let mut correct = sorted.iter().filter(|r| r.weak).count() as i64;
    for (m, r) in sorted.iter().enumerate() {
        if correct as f64 >= target {
            return m as f64 / n as f64;
        }
        correct += i64::from(r.strong) - i64::from(r.weak);
    }
    1.0
}

/// The 5th and 95th percentiles of [`share_for`] over `draws` resamples of
/// the rows (drawn with replacement): how much of a seed's figure is the
/// luck of which questions it asked.
fn share_spread(
    rows: &[&Row],
    quality: f64,
    draws: usize,
    seed: u64,
    score: impl Fn(&Row) -> f32,
) -> (f64, f64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut shares: Vec<f64> = (0..draws)
        .map(|_| {
            let sample: Vec<&Row> = (0..rows.len())
                .filter_map(|_| rows.get(rng.usize(..rows.len())).copied())
                .collect();
            share_for(&sample, quality, &score)
        })
        .collect();
    shares.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let i = ((shares.len().saturating_sub(1)) as f64 * p).round() as usize;
        shares.get(i).copied().unwrap_or(f64::NAN)
    };
    (at(0.05), at(0.95))
}

/// The router threshold and early-cascade threshold that reach `quality`
/// times the cloud's accuracy on `rows` with the smallest cloud share.
fn calibrate_joint(
    rows: &[&Row],
    quality: f64,
    k: usize,
    score: impl Fn(&Row) -> f32,
) -> (f32, f32) {
    let target = quality * mix(rows, |_| true).0 - 1e-9;
    let mut routers: Vec<f32> = rows.iter().map(|r| score(r)).collect();
    routers.push(f32::INFINITY);
    let mut cascades: Vec<f32> = rows
        .iter()
        .flat_map(|r| {
            let head = r.logprobs.iter().take(k.max(1)).sum::<f32>() / k.max(1) as f32;
            [r.confidence + 1e-6, head + 1e-6]
        })
        .collect();
    cascades.push(f32::NEG_INFINITY);
    let mut best = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f32::INFINITY,
        f32::INFINITY,
    );
    for &tr in &routers {
        for &tc in &cascades {
            let (acc, share) = mix(rows, |r| score(r) >= tr || r.early(k, tc) != Verdict::Kept);
            if acc >= target && (share < best.0 || (share == best.0 && acc > best.1)) {
                best = (share, acc, tr, tc);
            }
        }
    }
    (best.2, best.3)
}

/// `[router] cascade_prior` and the threshold (for a prompt at the
/// router's own threshold `tr`) that reach `quality` times the cloud's
/// accuracy on `rows` with the smallest cloud share: the bar a row's answer
/// must pass is `t + prior × (score − tr)`.
fn calibrate_prior(
    rows: &[&Row],
    quality: f64,
    k: usize,
    tr: f32,
    score: impl Fn(&Row) -> f32,
) -> (f32, f32) {
    let target = quality * mix(rows, |_| true).0 - 1e-9;
    let mut best = (f64::INFINITY, f64::NEG_INFINITY, 0.0, f32::INFINITY);
    for prior in [0.0f32, 0.5, 1.0, 2.0, 4.0, 8.0] {
        let shift = |r: &Row| prior * (score(r) - tr);
        let mut cands: Vec<f32> = rows
            .iter()
            .flat_map(|r| {
                let head = r.logprobs.iter().take(k.max(1)).sum::<f32>() / k.max(1) as f32;
                [r.confidence - shift(r) + 1e-6, head - shift(r) + 1e-6]
            })
            .collect();
        cands.push(f32::NEG_INFINITY);
        for t in cands {
            let (acc, share) = mix(rows, |r| r.early(k, t + shift(r)) != Verdict::Kept);
            if acc >= target && (share < best.0 || (share == best.0 && acc > best.1)) {
                best = (share, acc, prior, t);
            }
        }
    }
    (best.2, best.3)
}

/// Priors tried by [`calibrate_budget`]: 0 is the early cascade alone; 32
/// lets the router's score outweigh any answer's confidence.
const BUDGET_PRIORS: [f32; 8] = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0];

/// What the budget's rule is held to.
#[derive(Debug, Clone, Copy)]
struct Budget {
    /// The most requests sent out, as a share.
    share: f64,
    /// Tokens after which the early look judges.
    k: usize,
    /// The most device seconds an escalated request may cost, as a share
    /// of what the full cascade's escalations cost (calibrated for
    /// `quality` on the same questions).
    device: f64,
    /// The full cascade's target.
    quality: f64,
}

/// Router + early cascade under a cloud budget, as one rule: a request goes
/// out when `prior × score − m > cut`, where `m` is the lower of the local
/// answer's confidence and its first `k` tokens' (the early look). The
/// cut lets out at most the budget's share of `rows`; the prior is the one
/// of [`BUDGET_PRIORS`] that is most accurate on `rows` at that share while
/// its escalations cost the device no more than the budget allows (if
/// none does, the one that costs least). Those above `cut / prior` by
/// score alone go out without the device answering (confidences are at
/// most 0). The cut needs no label; only the prior is chosen by the labels
/// of `rows`.
fn calibrate_budget(rows: &[&Row], budget: Budget, score: impl Fn(&Row) -> f32) -> (f32, f32) {
    let k = budget.k;
    let full = full_cascade_seconds(rows, budget.quality);
    let mut best: Option<(f64, f64, f32, f32)> = None;
    let mut cheapest = (f64::INFINITY, 0.0, f32::INFINITY);
    for prior in BUDGET_PRIORS {
        let cut = budget_cut(rows, budget.share, |r| {
            prior * score(r) - r.early_confidence(k)
        });
        let bar = |r: &Row| prior * score(r) - cut;
        let (acc, share) = mix(rows, |r| r.early(k, bar(r)) != Verdict::Kept);
        let (secs, n) = budget_seconds(rows, k, bar);
        // Nothing to compare with (no timings, or a full cascade that
        // escalates none) leaves the device's time free.
        let cost = if n > 0 && full.is_finite() && full > 0.0 {
            secs / n as f64 / full
        } else {
            0.0
        };
        if cost < cheapest.0 {
            cheapest = (cost, prior, cut);
        }
        let better = best.is_none_or(|(a, s, _, _)| acc > a || (acc == a && share < s));
        if cost <= budget.device && better {
            best = Some((acc, share, prior, cut));
        }
    }
    best.map_or((cheapest.1, cheapest.2), |(_, _, prior, cut)| (prior, cut))
}

/// Device seconds spent on the requests a rule escalates, and how many
/// it escalates: none on those it sends `straight` out (the router's
/// alone, before the device answers), the early look's on those whose
/// answer falls below `bar` there, the whole answer's on the rest.
fn escalation_seconds(
    rows: &[&Row],
    k: usize,
    straight: impl Fn(&Row) -> bool,
    bar: impl Fn(&Row) -> f32,
) -> (f64, usize) {
    let (mut secs, mut n) = (0.0, 0usize);
    for r in rows {
        if straight(r) {
            n += 1;
            continue;
        }
        match r.early(k, bar(r)) {
            Verdict::Early => secs += r.seconds_to(k),
            Verdict::Late => secs += r.total_s,
            Verdict::Kept => continue,
        }
        n += 1;
    }
    (secs, n)
}

/// What [`escalation_seconds`] takes for [`calibrate_budget`]'s rule:
/// its bar above 0 escalates whatever the answer (confidences are at most
/// 0), so the router sends those out alone.
fn budget_seconds(rows: &[&Row], k: usize, bar: impl Fn(&Row) -> f32) -> (f64, usize) {
    escalation_seconds(rows, k, |r| bar(r) > 0.0, &bar)
}

/// Mean device seconds of an escalated request in the full cascade
/// calibrated for `quality` on `rows` (infinite when it escalates none).
fn full_cascade_seconds(rows: &[&Row], quality: f64) -> f64 {
    let t = calibrate(rows, quality);
    let (secs, n) = rows
        .iter()
        .filter(|r| r.confidence < t)
        .fold((0.0, 0usize), |(s, n), r| (s + r.total_s, n + 1));
    if n == 0 {
        f64::INFINITY
    } else {
        secs / n as f64
    }
}

/// The dispatcher's settings for [`calibrate_budget`]'s rule:
/// `cascade_threshold` and the learned router's threshold, if the router
/// is in front. With a prior, the threshold is `cut / prior` and
/// `cascade_threshold` 0, so the dispatcher's bar `prior × (score −
/// threshold)` is the rule's `prior × score − cut`, and what scores above
/// the threshold goes out without the device answering. Without one, the
/// early cascade alone at `−cut`.
fn dispatcher_settings(prior: f32, cut: f32) -> (f32, Option<f32>) {
    let b = share::bars(cut, prior);
    (b.cascade, b.router)
}

/// The cut above which at most `budget` of `rows` lie by `s`: halfway
/// between two neighbouring values, so that rounding in how the rule is
/// evaluated later cannot move a request across it.
fn budget_cut(rows: &[&Row], budget: f64, s: impl Fn(&Row) -> f32) -> f32 {
    share::cut(rows.iter().map(|r| s(r)).collect(), budget)
}

/// The rows of the half of the kinds of question (by their place in the
/// rounds of kinds) whose mean `score` is highest.
fn hardest_kinds<'a>(rows: &[&'a Row], score: impl Fn(&Row) -> f32) -> Vec<&'a Row> {
    let mut mean = [(0.0f64, 0usize); KINDS];
    for (i, r) in rows.iter().enumerate() {
        let m = &mut mean[i % KINDS];
        *m = (m.0 + f64::from(score(r)), m.1 + 1);
    }
    let mut order: Vec<usize> = (0..KINDS).collect();
    let avg = |k: usize| mean[k].0 / mean[k].1.max(1) as f64;
    order.sort_by(|&x, &y| avg(y).total_cmp(&avg(x)));
    order.truncate(KINDS / 2);
    rows.iter()
        .enumerate()
        .filter(|(i, _)| order.contains(&(i % KINDS)))
        .map(|(_, r)| *r)
        .collect()
}

/// [`calibrate_budget`]'s rule with its cut held online, as the dispatcher
/// holds `[router] cloud_share`: the questions in order, each decided by
/// the cut of the last `window` escalations (`start` until it warms up)
/// and then counted in — the router's alone by its score, an early
/// escalation by its first tokens, the rest by the lower of both looks.
/// Accuracy and cloud share, as [`mix`] gives them.
fn held_online(
    rows: &[&Row],
    k: usize,
    prior: f32,
    start: f32,
    budget: f64,
    window: usize,
    score: impl Fn(&Row) -> f32,
) -> (f64, f64) {
    let mut hold = share::ShareHold::new(budget as f32, window);
    let out: Vec<bool> = rows
        .iter()
        .map(|r| {
            let b = share::bars(hold.cut().unwrap_or(start), prior);
            let d = score(r);
            if b.router.is_some_and(|t| d >= t) {
                hold.record(prior * d, None, true);
                return true;
            }
            let bar = b.cascade + b.router.map_or(0.0, |t| prior * (d - t));
            let verdict = r.early(k, bar);
            let seen = match verdict {
                Verdict::Early => r.head(k).unwrap_or(r.confidence),
                _ => r.early_confidence(k),
            };
            let out = verdict != Verdict::Kept;
            hold.record(prior * d, Some(seen), out);
            out
        })
        .collect();
    let mut flags = out.iter();
    mix(rows, |_| flags.next().copied().unwrap_or(false))
}

/// `--write-questions`: both sets of questions as prompt files.
fn write_questions(
    dir: &std::path::Path,
    seed: u64,
    asked: usize,
    train: usize,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let sets = [
        (
            "train",
            questions(train, seed.wrapping_add(TRAIN_SEED), Part::Training),
        ),
        ("asked", questions(asked, seed, Part::Asked)),
    ];
    for (name, qs) in sets {
        let mut out = String::new();
        for (i, q) in qs.iter().enumerate() {
            let answer = match q.answer {
                Reference::Number(n) => serde_json::json!(n),
                Reference::Letter(c) => serde_json::json!(c.to_string()),
            };
            let line = serde_json::json!({
                "id": format!("{name}-{i}"),
                "prompt": q.prompt,
                "answer": answer,
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
        let path = dir.join(format!("{name}.jsonl"));
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} questions to {}", qs.len(), path.display());
    }
    Ok(())
}

/// Runs the benchmark and prints its table.
pub async fn run(args: CascadeArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.rows {
        let saved: Saved = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{} is not a run's rows", path.display()))?;
        let threshold = report(&args, &saved);
        println!("\nSet `[router] cascade_threshold = {threshold:.3}` to use this calibration.");
        return Ok(());
    }
    if let Some(dir) = &args.write_questions {
        return write_questions(dir, args.seed, args.questions, args.train_questions);
    }
    let qs = questions(args.questions, args.seed, Part::Asked);
    let cloud_url = format!("http://127.0.0.1:{}", args.cloud_port);
    eprintln!(
        "starting a cloud-role Tandem with {} on {cloud_url} ...",
        args.strong
    );
    let port = args.cloud_port.to_string();
    let mut cloud_proc = spawn(&[
        "serve",
        "--role",
        "cloud",
        "--port",
        &port,
        "--model",
        &args.strong,
        "--parallel",
        "1",
    ])?;
    wait_healthy(&cloud_url, &mut cloud_proc.0).await?;
    let mut up = UpstreamConfig::new("cloud", &format!("{cloud_url}/v1"), &[args.strong.as_str()]);
    up.ttft_timeout_ms = 120_000;
    up.continuation = tandem_backends::Continuation::Prefill;
    let cloud = CloudBackend::new(up).map_err(anyhow::Error::msg)?;
    let engine_opts = EngineOptions {
        context: Some(1024),
        parallel: Some(1),
        ..EngineOptions::default()
    };
    let local = load_engine(&args.weak, &engine_opts).await?;
    let embedder = load_embedder().await?;
    let router_path = tandem_catalog::router_path();
    let scorer = if router_path.is_file() {
        Some(load_router(&router_path, &embedder).await?)
    } else {
        eprintln!(
            "no router at {} (`tandem router train`); the router row is skipped",
            router_path.display()
        );
        None
    };

    let own = if args.train_questions > 0 {
        eprintln!(
            "labelling {} other questions with this pair to train its own router ...",
            args.train_questions
        );
        Some(own_router(&args, &local, &cloud, &embedder).await?)
    } else {
        None
    };

    let mut rows = Vec::with_capacity(qs.len());
    for (i, q) in qs.iter().enumerate() {
        let (weak, first_s, total_s) =
            timed(local.submit(request(&args.weak, &q.prompt, args.max_tokens))?).await?;
        let strong_stream = cloud
            .generate(request(&args.strong, &q.prompt, args.max_tokens))
            .await
            .context("the cloud side")?;
        let strong = Answer::collect(strong_stream).await?;
        let difficulty = match &scorer {
            Some(r) => Some(match r.score_static(&q.prompt) {
                Some(score) => score.map_err(anyhow::Error::msg)?,
                None => r.scorer.score(&embedder.embed_one(&q.prompt)?, &q.prompt),
            }),
            None => None,
        };
        let own = match &own {
            Some(m) => Some(m.score(&embedder.embed_one(&q.prompt)?, &TextView::of(&q.prompt))),
            None => None,
        };
        let row = Row {
            weak: q.answer.passes(&weak.text),
            strong: q.answer.passes(&strong.text),
            confidence: confidence(&weak.tokens),
            difficulty,
            own,
            logprobs: weak.tokens.iter().map(|t| t.logprob).collect(),
            first_s,
            total_s,
        };
        eprintln!(
            "[{:>2}/{}] local {} (confidence {:>6.3}) cloud {}  {:?} | {:?}",
            i + 1,
            qs.len(),
            if row.weak { "right" } else { "wrong" },
            row.confidence,
            if row.strong { "right" } else { "wrong" },
            weak.text.trim().chars().take(24).collect::<String>(),
            strong.text.trim().chars().take(24).collect::<String>(),
        );
        rows.push(row);
    }

    // Every question's figures, for analyses the table does not make.
    let saved = Saved {
        router_threshold: scorer.as_ref().map(|r| r.scorer.model().threshold),
        own_threshold: own.as_ref().map(|m| m.threshold),
        rows,
    };
    let dump = args.chart.with_extension("rows.json");
    if let Err(e) = std::fs::write(&dump, serde_json::to_vec(&saved)?) {
        eprintln!("{}: {e}", dump.display());
    }
    let threshold = report(&args, &saved);
    let k = args.early_tokens;
    // The same cascade live through the dispatcher: with the own router
    // in front of it under the cloud budget when there is one (the
    // pair's goal), else alone at the quality target.
    let mut policy = PolicyConfig {
        cascade: true,
        cascade_threshold: threshold,
        cascade_early_tokens: k,
        ..PolicyConfig::default()
    };
    let mut offline = None;
    let mut builder = Dispatcher::builder();
    let mut scorer = None;
    if let Some(mut model) = own {
        let all: Vec<&Row> = saved.rows.iter().collect();
        let score = |r: &Row| r.own.unwrap_or(0.0);
        let budget = Budget {
            share: args.cloud_budget,
            k,
            device: args.device_cap,
            quality: args.quality,
        };
        let (prior, cut) = calibrate_budget(&all, budget, score);
        let window = policy.cloud_share_window;
        offline = Some(held_online(
            &all,
            k,
            prior,
            cut,
            budget.share,
            window,
            score,
        ));
        let (cascade_threshold, router_threshold) = dispatcher_settings(prior, cut);
        policy.cascade_threshold = cascade_threshold;
        policy.cascade_prior = prior;
        policy.cloud_share = Some(budget.share as f32);
        if let Some(t) = router_threshold {
            model.threshold = t;
            let dim = embedder.embed_one("dimension")?.len();
            scorer = Some(LearnedScorer::new(model, dim).map_err(anyhow::Error::msg)?);
            builder = builder.embedder(crate::setup::EMBEDDER, embedder.clone());
        }
    }
    let d: Arc<Dispatcher> = builder
        .policy(policy.clone())
        .local(local)
        .cloud(cloud)
        .build()
        .map_err(anyhow::Error::msg)?;
    if let Some(s) = scorer {
        d.set_scorer(Arc::new(s), RouterInput::Embedder);
    }
    let (mut correct, mut escalated) = (0usize, 0usize);
    for q in &qs {
        let mut req = request("tandem/auto", &q.prompt, args.max_tokens);
        req.logprobs = None;
        let out = d.dispatch(req, RequestContext::default()).await?;
        if out.route.backend != "local" {
            escalated += 1;
        }
        let answer = Answer::collect(out.stream).await?;
        correct += usize::from(q.answer.passes(&answer.text));
    }
    let n = qs.len().max(1) as f64;
    let live = (correct as f64 / n, escalated as f64 / n);
    match offline {
        Some((acc, share)) => {
            println!(
                "{:<34} {:>9.3} {:>12.3}",
                "own router + early, held, live", live.0, live.1
            );
            println!(
                "\nlive through the dispatcher (cascade_prior = {}, cloud_share = {:.2} held over the last {} \
                 requests, starting from cascade_threshold = {:.3} and the cut calibrated on all questions): \
                 accuracy {:.3} at cloud share {:.3}, {:.1}% of cloud-only; \
                 the same on the recorded answers: {acc:.3} at {share:.3}",
                policy.cascade_prior,
                args.cloud_budget,
                policy.cloud_share_window,
                policy.cascade_threshold,
                live.0,
                live.1,
                100.0 * live.0
                    / mix(&saved.rows.iter().collect::<Vec<_>>(), |_| true)
                        .0
                        .max(1e-9),
            );
        }
        None => {
            println!(
                "{:<34} {:>9.3} {:>12.3}",
                format!("early cascade live (t {threshold:.3}, k={k})"),
                live.0,
                live.1
            );
            println!(
                "\nconfidence = mean token log-probability of the local answer; target {:.0}% of the cloud's accuracy.\n\
                 Set `[router] cascade_threshold = {threshold:.3}` to use this calibration.",
                args.quality * 100.0
            );
        }
    }
    drop(cloud_proc);
    Ok(())
}

/// Prints the table (and draws the chart) for `rows`, and returns the
/// cascade threshold calibrated on all of them.
fn report(args: &CascadeArgs, saved: &Saved) -> f32 {
    let router_t = saved.router_threshold;
    let all: Vec<&Row> = saved.rows.iter().collect();
    let (local_acc, _) = mix(&all, |_| false);
    let (cloud_acc, _) = mix(&all, |_| true);
    // Two folds: calibrate on one half, score the other.
    let (a, b) = halves(&all);
    let (ta, tb) = (calibrate(&a, args.quality), calibrate(&b, args.quality));
    let (acc_b, share_b) = mix(&b, |r| r.confidence < ta);
    let (acc_a, share_a) = mix(&a, |r| r.confidence < tb);
    let cv_acc = (acc_a * a.len() as f64 + acc_b * b.len() as f64) / all.len() as f64;
    let cv_share = (share_a * a.len() as f64 + share_b * b.len() as f64) / all.len() as f64;
    let threshold = calibrate(&all, args.quality);

    println!();
    println!(
        "{} questions; local {} , cloud {} (a cloud-role Tandem)",
        all.len(),
        args.weak,
        args.strong
    );
    println!("{:<34} {:>9} {:>12}", "mode", "accuracy", "cloud share");
    println!("{:<34} {:>9.3} {:>12.3}", "local only", local_acc, 0.0);
    println!("{:<34} {:>9.3} {:>12.3}", "cloud only", cloud_acc, 1.0);
    let mut chart = vec![
        Series::curve("random", vec![(0.0, local_acc), (1.0, cloud_acc)]),
        Series::point("device only", 0.0, local_acc),
        Series::point("cloud only", 1.0, cloud_acc),
    ];
    if let Some(t) = router_t {
        let (acc, share) = mix(&all, |r| r.difficulty.is_some_and(|d| d >= t));
        println!(
            "{:<34} {:>9.3} {:>12.3}",
            format!("router (threshold {t:.2})"),
            acc,
            share
        );
        chart.push(Series::point("router, shared labels", share, acc));
    }
    println!(
        "{:<34} {:>9.3} {:>12.3}",
        "cascade (2-fold cross-validated)", cv_acc, cv_share
    );
    chart.push(Series::point("cascade", cv_share, cv_acc));

    // The early cascade: the same thresholds, also judged after the first
    // `k` tokens; and the router in front of it (its cloud calls cost the
    // device nothing).
    let k = args.early_tokens;
    let folds = [(&a, tb), (&b, ta)];
    let routed = |r: &Row| router_t.is_some_and(|t| r.difficulty.is_some_and(|d| d >= t));
    let mut early = (0.0, 0.0);
    let mut both = (0.0, 0.0);
    let (mut full_s, mut full_n, mut early_s, mut early_n) = (0.0, 0usize, 0.0, 0usize);
    for (rows, t) in folds {
        let w = rows.len() as f64 / all.len() as f64;
        let (acc, share) = mix(rows, |r| r.early(k, t) != Verdict::Kept);
        early = (early.0 + acc * w, early.1 + share * w);
        let (acc, share) = mix(rows, |r| routed(r) || r.early(k, t) != Verdict::Kept);
        both = (both.0 + acc * w, both.1 + share * w);
        for r in rows.iter() {
            if r.confidence < t {
                full_s += r.total_s;
                full_n += 1;
            }
            match r.early(k, t) {
                Verdict::Early => {
                    early_s += r.seconds_to(k);
                    early_n += 1;
                }
                Verdict::Late => {
                    early_s += r.total_s;
                    early_n += 1;
                }
                Verdict::Kept => {}
            }
        }
    }
    println!(
        "{:<34} {:>9.3} {:>12.3}",
        format!("early cascade (k={k}, 2-fold)"),
        early.0,
        early.1
    );
    chart.push(Series::point(
        format!("early cascade (k={k})"),
        early.1,
        early.0,
    ));
    if router_t.is_some() {
        println!(
            "{:<34} {:>9.3} {:>12.3}",
            "router + early cascade (2-fold)", both.0, both.1
        );
        chart.push(Series::point(
            "router (shared) + early cascade",
            both.1,
            both.0,
        ));
    }
    let mean = |s: f64, n: usize| if n == 0 { 0.0 } else { s / n as f64 };
    println!(
        "device seconds per escalated request: full cascade {:.3} ({full_n}), early cascade {:.3} ({early_n}); ratio {:.2}",
        mean(full_s, full_n),
        mean(early_s, early_n),
        mean(early_s, early_n) / mean(full_s, full_n).max(1e-9)
    );

    // The router trained on this pair's own labels: alone, against random
    // routing at every share, and in front of the early cascade with both
    // thresholds chosen together on one fold and scored on the other.
    if let Some(t) = saved.own_threshold {
        let score = |r: &Row| r.own.unwrap_or(0.0);
        let (acc, share) = mix(&all, |r| score(r) >= t);
        println!(
            "{:<34} {:>9.3} {:>12.3}",
            format!("router, own labels (threshold {t:.2})"),
            acc,
            share
        );
        let joint = [
            (&a, calibrate_joint(&b, args.quality, k, score)),
            (&b, calibrate_joint(&a, args.quality, k, score)),
        ];
        let (mut acc, mut share) = (0.0, 0.0);
        let (mut own_s, mut own_n) = (0.0, 0usize);
        for (rows, (tr, tc)) in joint {
            let w = rows.len() as f64 / all.len() as f64;
            let (fa, fs) = mix(rows, |r| score(r) >= tr || r.early(k, tc) != Verdict::Kept);
            acc += fa * w;
            share += fs * w;
            let (secs, n) = escalation_seconds(rows, k, |r| score(r) >= tr, |_| tc);
            own_s += secs;
            own_n += n;
        }
        println!(
            "{:<34} {:>9.3} {:>12.3}",
            "own router + early cascade (2-fold)", acc, share
        );
        chart.push(Series::point("own router + early cascade", share, acc));
        println!(
            "own router + early cascade: {:.1}% of cloud-only accuracy at cloud share {share:.3}; \
             device seconds per escalated request {:.3} ({own_n}), {:.2} of the full cascade's",
            100.0 * acc / cloud_acc.max(1e-9),
            mean(own_s, own_n),
            mean(own_s, own_n) / mean(full_s, full_n).max(1e-9)
        );
        // The router's score as the cascade's prior: one bar, moved by it.
        let tr = t;
        let fold_b = calibrate_prior(&b, args.quality, k, tr, score);
        let fold_a = calibrate_prior(&a, args.quality, k, tr, score);
        let (mut acc, mut share) = (0.0, 0.0);
        let (mut prior_s, mut prior_n) = (0.0, 0usize);
        for (rows, (prior, t)) in [(&a, fold_b), (&b, fold_a)] {
            let w = rows.len() as f64 / all.len() as f64;
            let bar = |r: &Row| t + prior * (score(r) - tr);
            let (fa, fs) = mix(rows, |r| r.early(k, bar(r)) != Verdict::Kept);
            acc += fa * w;
            share += fs * w;
            let (secs, n) = escalation_seconds(rows, k, |_| false, bar);
            prior_s += secs;
            prior_n += n;
        }
        let (prior, t) = calibrate_prior(&all, args.quality, k, tr, score);
        println!(
            "{:<34} {:>9.3} {:>12.3}",
            "early cascade, own router as prior", acc, share
        );
        println!(
            "early cascade with the own router's prior: {:.1}% of cloud-only accuracy at cloud share {share:.3}; \
             device seconds per escalated request {:.3} ({prior_n}), {:.2} of the full cascade's; \
             on all questions: cascade_prior = {prior}, cascade_threshold = {t:.3}",
            100.0 * acc / cloud_acc.max(1e-9),
            mean(prior_s, prior_n),
            mean(prior_s, prior_n) / mean(full_s, full_n).max(1e-9)
        );
        chart.push(Series::point(
            "early cascade, own router as prior",
            share,
            acc,
        ));
        // The same two, under a cloud budget: the cut from the other
        // half's scores (no labels), the prior from its labels.
        let budget = Budget {
            share: args.cloud_budget,
            k,
            device: args.device_cap,
            quality: args.quality,
        };
        let b_budget = budget.share;
        let (mut acc, mut share) = (0.0, 0.0);
        let (mut budget_s, mut budget_n, mut straight) = (0.0, 0usize, 0usize);
        // Each half decided with the settings calibrated on the other.
        let folds = [
            (&a, calibrate_budget(&b, budget, score)),
            (&b, calibrate_budget(&a, budget, score)),
        ];
        for &(rows, (prior, cut)) in &folds {
            let w = rows.len() as f64 / all.len() as f64;
            let bar = |r: &Row| prior * score(r) - cut;
            let (fa, fs) = mix(rows, |r| r.early(k, bar(r)) != Verdict::Kept);
            acc += fa * w;
            share += fs * w;
            let (secs, n) = budget_seconds(rows, k, bar);
            budget_s += secs;
            budget_n += n;
            straight += rows.iter().filter(|r| bar(r) > 0.0).count();
        }
        let (prior, cut) = calibrate_budget(&all, budget, score);
        // The router's scores are percentiles of its training prompts',
        // so its threshold is a share to calibrate it for.
        let front = match dispatcher_settings(prior, cut) {
            (c, Some(t)) => format!(
                "cascade_threshold = {c}, the router's threshold {t:.3} \
                 (`tandem router train --calibrate share={:.3}`)",
                (1.0 - t).clamp(0.0, 1.0)
            ),
            (c, None) => format!("cascade_threshold = {c:.3}, no router in front"),
        };
        println!(
            "{:<34} {:>9.3} {:>12.3}",
            format!("own router + early, budget {b_budget:.2}"),
            acc,
            share
        );
        println!(
            "own router + early cascade at a cloud budget of {b_budget:.2} (2-fold: prior chosen on one half, \
             cut from its scores): {:.1}% of cloud-only accuracy at cloud share {share:.3}; \
             {straight} of {budget_n} escalations by the router alone; device seconds per escalated request \
             {:.3}, {:.2} of the full cascade's; on all questions: cascade_prior = {prior}, {front}",
            100.0 * acc / cloud_acc.max(1e-9),
            mean(budget_s, budget_n),
            mean(budget_s, budget_n) / mean(full_s, full_n).max(1e-9),
        );
        chart.push(Series::point(
            format!("own router + early cascade, cloud budget {b_budget:.2}"),
            share,
            acc,
        ));
        // The same rule with the cut held online (`[router] cloud_share`):
        // each half in order, starting from the other half's cut.
        let window = PolicyConfig::default().cloud_share_window;
        let (mut acc, mut share) = (0.0, 0.0);
        for &(rows, (prior, cut)) in &folds {
            let w = rows.len() as f64 / all.len() as f64;
            let (fa, fs) = held_online(rows, k, prior, cut, b_budget, window, score);
            acc += fa * w;
            share += fs * w;
        }
        println!(
            "{:<34} {:>9.3} {:>12.3}",
            format!("  held online ({window} requests)"),
            acc,
            share
        );
        println!(
            "the same with the cut held online over the last {window} requests \
             (`[router] cloud_share = {b_budget:.2}` with that cascade_prior; 2-fold, the other half's cut \
             until {} are in): {:.1}% of cloud-only accuracy at cloud share {share:.3}",
            share::WARMUP,
            100.0 * acc / cloud_acc.max(1e-9),
        );
        chart.push(Series::point(
            format!("the same, cloud share {b_budget:.2} held online"),
            share,
            acc,
        ));
        // Traffic unlike what the cut was calibrated on: of each half, only
        // the kinds of question the router scores hardest (no labels needed
        // to pick them), decided with the other, whole half's settings.
        let kinds = hardest_kinds(&all, score);
        let (mut fixed, mut held, mut n_shift) = ((0.0, 0.0), (0.0, 0.0), 0usize);
        for &(rows, (prior, cut)) in &folds {
            let shifted: Vec<&Row> = rows
                .iter()
                .copied()
                .filter(|r| kinds.iter().any(|&k| std::ptr::eq(*r, k)))
                .collect();
            let w = shifted.len() as f64;
            let bar = |r: &Row| prior * score(r) - cut;
            let (fa, fs) = mix(&shifted, |r| r.early(k, bar(r)) != Verdict::Kept);
            let (ha, hs) = held_online(&shifted, k, prior, cut, b_budget, window, score);
            fixed = (fixed.0 + fa * w, fixed.1 + fs * w);
            held = (held.0 + ha * w, held.1 + hs * w);
            n_shift += shifted.len();
        }
        let m = n_shift.max(1) as f64;
        println!(
            "when the traffic shifts to the half of the kinds of question the router scores hardest \
             ({n_shift} questions): the fixed cut sends out {:.3} (accuracy {:.3}), held online {:.3} \
             (accuracy {:.3}); cloud only {:.3}",
            fixed.1 / m,
            fixed.0 / m,
            held.1 / m,
            held.0 / m,
            mix(
                &all.iter()
                    .copied()
                    .filter(|r| kinds.iter().any(|&k| std::ptr::eq(*r, k)))
                    .collect::<Vec<_>>(),
                |_| true
            )
            .0,
        );
        println!("own-label router against random routing, accuracy at each cloud share:");
        let cmp = against_random(&all, score);
        for (share, acc, random) in &cmp {
            println!("  share {share:.2}: router {acc:.3}, random {random:.3}");
        }
        println!(
            "  better than random at {} of {} shares",
            cmp.iter().filter(|(_, a, r)| a > r).count(),
            cmp.len()
        );
        let (lo, hi) = share_spread(&all, args.quality, 1000, args.seed, score);
        println!(
            "own-label router alone: {:.0}% of cloud-only accuracy from cloud share {:.3} \
             (90% of 1,000 resamples of these {} questions: {lo:.3}–{hi:.3})",
            100.0 * args.quality,
            share_for(&all, args.quality, score),
            all.len()
        );
        let mut curve = vec![(0.0, local_acc)];
        curve.extend(cmp.iter().map(|&(share, acc, _)| (share, acc)));
        curve.push((1.0, cloud_acc));
        chart.push(Series::curve("router, own labels", curve));
    }
    let title = format!(
        "{} questions: {} on the device, {} in the cloud",
        all.len(),
        args.weak,
        args.strong
    );
    match crate::chart::accuracy_vs_share(&args.chart, &title, &chart) {
        Ok(()) => println!("chart: {}", args.chart.display()),
        Err(e) => eprintln!("no chart: {e:#}"),
    }

    threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_learns_from_questions_the_table_never_asks() {
        let qs = questions(40, 1, Part::Asked);
        assert_eq!(qs.len(), 40);
        let train = questions(80, 1 + TRAIN_SEED, Part::Training);
        assert!(
            train
                .iter()
                .all(|t| qs.iter().all(|q| q.prompt != t.prompt))
        );
    }

    #[test]
    fn written_questions_read_back_as_label_prompts() {
        let dir = std::env::temp_dir().join(format!("tandem-q-{}", std::process::id()));
        write_questions(&dir, 5, 16, 24).expect("written");
        for (name, qs) in [
            ("train", questions(24, 5 + TRAIN_SEED, Part::Training)),
            ("asked", questions(16, 5, Part::Asked)),
        ] {
            let text = std::fs::read_to_string(dir.join(format!("{name}.jsonl"))).expect("read");
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("json"))
                .collect();
            assert_eq!(lines.len(), qs.len());
            for (l, q) in lines.iter().zip(&qs) {
                assert_eq!(l["prompt"], q.prompt.as_str());
                assert_eq!(Reference::parse(&l["answer"]), Some(q.answer), "{l}");
            }
            // Both kinds are in each file.
            assert!(lines.iter().any(|l| l["answer"].is_string()));
            assert!(lines.iter().any(|l| l["answer"].is_i64()));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn multiple_choice_questions_are_not_repeated_and_answer_right() {
        let asked = questions(960, 7, Part::Asked);
        let train = questions(320, 7 + TRAIN_SEED, Part::Training);
        let choices = |qs: &[Question]| -> Vec<(String, char)> {
            qs.iter()
                .filter_map(|q| match q.answer {
                    Reference::Letter(c) => Some((q.prompt.clone(), c)),
                    _ => None,
                })
                .collect()
        };
        let (a, t) = (choices(&asked), choices(&train));
        assert_eq!(a.len(), 120);
        let distinct: std::collections::HashSet<&String> = a.iter().map(|(p, _)| p).collect();
        // Four options in a drawn order over twelve facts a family: a
        // repeat is possible but rare.
        assert!(distinct.len() >= 115, "{} distinct of 120", distinct.len());
        let subject = |p: &str| p.lines().next().unwrap_or("").to_string();
        let asked_subjects: std::collections::HashSet<String> =
            a.iter().map(|(p, _)| subject(p)).collect();
        assert!(t.iter().all(|(p, _)| !asked_subjects.contains(&subject(p))));
        // Nor could they: no written question of one part asks a fact of
        // the other's.
        for (template, facts) in FAMILIES {
            for (i, (s, _)) in facts.iter().enumerate() {
                let other = if i % 2 == 0 { MCQ_TRAIN } else { MCQ };
                let q = template.replace("{}", s);
                assert!(other.iter().all(|(w, _)| subject(w) != q), "{q}");
            }
        }
        // The letter given as the answer names the fact's value.
        for (prompt, letter) in a.iter().chain(&t) {
            let line = prompt
                .lines()
                .find(|l| l.starts_with(&format!("{letter})")))
                .unwrap_or_default();
            let value = line.get(3..).unwrap_or_default();
            let first = subject(prompt);
            let known = FAMILIES.iter().any(|(template, facts)| {
                facts
                    .iter()
                    .any(|(s, v)| template.replace("{}", s) == first && *v == value)
            }) || MCQ
                .iter()
                .chain(MCQ_TRAIN)
                .any(|(q, c)| prompt.starts_with(q) && c == letter);
            assert!(known, "{prompt:?} -> {letter}");
        }
    }

    #[test]
    fn each_half_asks_every_kind_alike() {
        let qs = questions(80, 3, Part::Asked);
        let all: Vec<&Question> = qs.iter().collect();
        let (a, b) = halves(&all);
        assert_eq!((a.len(), b.len()), (40, 40));
        let kind = |q: &Question| {
            let p = q.prompt.as_str();
            // The more particular first: "x +" before "+", "Pens" (… times as
            // many …) before "times".
            [
                "x +",
                "Pens",
                "times",
                "apples",
                "train",
                "remainder",
                "letter",
                "+",
            ]
            .iter()
            .position(|w| p.contains(w))
        };
        for half in [&a, &b] {
            let mut count = [0; KINDS];
            for q in half.iter() {
                if let Some(k) = kind(q) {
                    count[k] += 1;
                }
            }
            assert_eq!(count, [5; KINDS], "{count:?}");
        }
    }

    #[test]
    fn the_early_look_judges_the_first_tokens() {
        let row = |lp: &[f32]| Row {
            confidence: lp.iter().sum::<f32>() / lp.len() as f32,
            logprobs: lp.to_vec(),
            first_s: 1.0,
            total_s: 1.0 + 0.1 * (lp.len() - 1) as f64,
            ..Row::default()
        };
        let unsure_start = row(&[-2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(unsure_start.early(2, -1.0), Verdict::Early);
        assert_eq!(unsure_start.early(0, -1.0), Verdict::Kept);
        let unsure_end = row(&[0.0, 0.0, -3.0, -3.0, -3.0]);
        assert_eq!(unsure_end.early(2, -1.0), Verdict::Late);
        assert_eq!(row(&[-0.1; 4]).early(2, -1.0), Verdict::Kept);
        // Too short for the look: only the whole answer is judged.
        assert_eq!(row(&[-2.0]).early(2, -1.0), Verdict::Late);
        // Time to the look: the first token and one more token.
        assert!((unsure_start.seconds_to(2) - 1.1).abs() < 1e-9);
        assert!((unsure_start.seconds_to(50) - unsure_start.total_s).abs() < 1e-9);
    }

    #[test]
    fn the_share_for_a_quality_and_its_spread() {
        let row = |weak: bool, strong: bool, own: f32| Row {
            weak,
            strong,
            own: Some(own),
            ..Row::default()
        };
        // Two questions only the cloud gets right, ranked first; two both
        // get right; one neither does.
        let rows = [
            row(false, true, 0.9),
            row(true, true, 0.1),
            row(false, true, 0.8),
            row(false, false, 0.5),
            row(true, true, 0.2),
        ];
        let all: Vec<&Row> = rows.iter().collect();
        let score = |r: &Row| r.own.unwrap_or(0.0);
        assert!((share_for(&all, 1.0, score) - 0.4).abs() < 1e-9);
        // 95% of 4 right answers is 3.8: both cloud-only ones must go.
        assert!((share_for(&all, 0.95, score) - 0.4).abs() < 1e-9);
        assert!((share_for(&all, 0.75, score) - 0.2).abs() < 1e-9);
        // Ranked backwards, the cloud-only questions come last.
        assert!((share_for(&all, 1.0, |r| -score(r)) - 1.0).abs() < 1e-9);
        assert_eq!(share_for(&[], 0.95, score), 0.0);
        let (lo, hi) = share_spread(&all, 0.95, 200, 1, score);
        assert!(lo <= 0.4 && 0.4 <= hi && lo <= hi, "{lo} {hi}");
        assert_eq!(share_spread(&all, 0.95, 200, 1, score), (lo, hi));
    }

    #[test]
    fn the_budget_mixes_router_and_confidence_within_the_share() {
        let row = |weak: bool, strong: bool, own: f32, lp: f32| Row {
            weak,
            strong,
            own: Some(own),
            confidence: lp,
            logprobs: vec![lp],
            ..Row::default()
        };
        // Only the cloud gets the first two right: one the router finds
        // hard though the device is sure of itself, one the router finds
        // easy though the device is unsure. Neither alone finds both.
        let rows = [
            row(false, true, 0.9, -0.01),
            row(false, true, 0.1, -2.0),
            row(true, true, 0.8, -0.05),
            row(true, true, 0.2, -0.02),
        ];
        let all: Vec<&Row> = rows.iter().collect();
        let score = |r: &Row| r.own.unwrap_or(0.0);
        let free = Budget {
            share: 0.5,
            k: 8,
            device: f64::INFINITY,
            quality: 0.95,
        };
        let (prior, cut) = calibrate_budget(&all, free, score);
        assert!((0.5..=2.0).contains(&prior), "prior {prior}");
        let out = |r: &Row| r.early(8, prior * score(r) - cut) != Verdict::Kept;
        assert_eq!(mix(&all, out), (1.0, 0.5));
        assert!(out(&rows[0]) && out(&rows[1]));
        // The router alone or the confidence alone is worse at that share.
        for only in [0.0, 32.0] {
            let c = budget_cut(&all, 0.5, |r| only * score(r) - r.early_confidence(8));
            let (acc, share) = mix(&all, |r| r.early(8, only * score(r) - c) != Verdict::Kept);
            assert!(acc < 1.0 && share <= 0.5, "{only}: {acc} {share}");
        }
        // The dispatcher's bar, prior × (score − router threshold), is the
        // rule's, so what it routes straight out is what the rule escalates
        // whatever the answer.
        let (zero, t) = dispatcher_settings(prior, cut);
        let t = t.unwrap_or(f32::NAN);
        assert_eq!(zero, 0.0);
        // Without a prior, the early cascade alone: no router in front.
        assert_eq!(dispatcher_settings(0.0, 1.5), (-1.5, None));
        for r in &rows {
            assert!((prior * (score(r) - t) - (prior * score(r) - cut)).abs() < 1e-5);
        }
        // Never more than the budget, even with ties; none at a budget of 0.
        let same: Vec<Row> = (0..5).map(|_| row(false, true, 0.5, -1.0)).collect();
        let same: Vec<&Row> = same.iter().collect();
        let (p, c) = calibrate_budget(&same, Budget { share: 0.4, ..free }, score);
        assert!(mix(&same, |r| r.early(8, p * score(r) - c) != Verdict::Kept).1 <= 0.4);
        let (p, c) = calibrate_budget(&all, Budget { share: 0.0, ..free }, score);
        assert_eq!(
            mix(&all, |r| r.early(8, p * score(r) - c) != Verdict::Kept).1,
            0.0
        );
        // Held to a quarter of the device time a full cascade spends per
        // escalation, the rule gives up the unsure answer (only the device
        // finds it, after answering in full) and lets the router alone
        // send out what it sends.
        let timed: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                logprobs: r.logprobs.clone(),
                own: r.own,
                total_s: 1.0,
                first_s: 1.0,
                ..*r
            })
            .collect();
        let timed: Vec<&Row> = timed.iter().collect();
        let capped = Budget {
            device: 0.25,
            ..free
        };
        let (p, c) = calibrate_budget(&timed, capped, score);
        let bar = |r: &Row| p * score(r) - c;
        assert_eq!(
            mix(&timed, |r| r.early(8, bar(r)) != Verdict::Kept),
            (0.75, 0.5)
        );
        assert_eq!(budget_seconds(&timed, 8, bar), (0.0, 2));
        let (p, c) = calibrate_budget(&timed, free, score);
        let (secs, n) = budget_seconds(&timed, 8, |r| p * score(r) - c);
        assert!(n == 2 && secs > 0.5, "{secs} {n}");
    }

    #[test]
    fn calibration_reaches_the_target_with_few_escalations() {
        let rows = [
            Row {
                weak: true,
                strong: true,
                confidence: -0.01,
                difficulty: None,
                ..Row::default()
            },
            Row {
                weak: false,
                strong: true,
                confidence: -0.9,
                difficulty: None,
                ..Row::default()
            },
            Row {
                weak: true,
                strong: true,
                confidence: -0.05,
                difficulty: None,
                ..Row::default()
            },
            Row {
                weak: false,
                strong: false,
                confidence: -0.2,
                difficulty: None,
                ..Row::default()
            },
        ];
        let all: Vec<&Row> = rows.iter().collect();
        let t = calibrate(&all, 1.0);
        // Escalating only the least confident answer reaches the cloud's accuracy.
        assert_eq!(mix(&all, |r| r.confidence < t), (0.75, 0.25));
    }
}
