//! Tests of the GBNF reader (`tandem_engine::gbnf`) with the grammar
//! compiled by llguidance, whose input is a client's text: cases written by
//! hand, and properties:
//!
//! - any text, and any mangling of a valid grammar, is read or refused
//!   with a message; nothing panics, and what is read compiles or is
//!   refused by llguidance without a panic either;
//! - exactness, against an independent reference: grammars generated as
//!   trees (strings, classes, `.`, sequences, alternatives, every
//!   repetition, rules referring to rules), written out as GBNF with the
//!   spacing, newlines and comments people write, accept exactly the
//!   strings that the same tree as a `regex` crate expression matches —
//!   strings drawn from the grammar and strings drawn at random.
//!
//! CI runs a short form; `PROPTEST_CASES=100000 cargo test --release -p
//! tandem-engine --test fuzz_gbnf` is the long run.

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::ApproximateTokEnv;
use llguidance::{Matcher, ParserFactory};
use proptest::prelude::*;
use tandem_engine::gbnf::to_lark;

/// A grammar as a tree, which can be written both as GBNF and as a regex.
#[derive(Debug, Clone)]
enum Node {
    Literal(String),
    Class(Vec<(char, char)>, bool),
    Any,
    Seq(Vec<Node>),
    Alt(Vec<Node>),
    Repeat(Box<Node>, u32, Option<u32>),
    /// A rule of its own, referred to by name.
    Rule(Box<Node>),
}

/// Characters the strings are drawn from: some that GBNF or regexes
/// escape, one outside ASCII, a newline.
const CHARS: &[char] = &['a', 'b', 'c', '"', '\\', ']', '-', 'é', '\n'];

/// Mostly `a` and `b`, so that one literal often begins another, where a
/// reader that kept longest matches (as Lark's lexer does) would go wrong.
fn character() -> impl Strategy<Value = char> {
    prop_oneof![
        6 => proptest::sample::select(&['a', 'b'][..]),
        2 => proptest::sample::select(CHARS),
    ]
}

fn literal() -> impl Strategy<Value = String> {
    proptest::collection::vec(character(), 0..4).prop_map(|v| v.into_iter().collect())
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        4 => literal().prop_map(Node::Literal),
        2 => (
            proptest::collection::vec(
                (proptest::sample::select(CHARS), 0u32..3).prop_map(|(c, n)| {
                    let end = char::from_u32(c as u32 + n).unwrap_or(c);
                    (c, end)
                }),
                1..3
            ),
            any::<bool>()
        )
            .prop_map(|(r, neg)| Node::Class(r, neg)),
        1 => Just(Node::Any),
    ];
    // Literals in alternatives in a row: where a longest-match reader
    // would take "ab" and leave "c" for `"bc"`.
    let lattice = proptest::collection::vec(
        proptest::collection::vec(literal().prop_map(Node::Literal), 1..3).prop_map(Node::Alt),
        1..4,
    )
    .prop_map(Node::Seq);
    let leaf = prop_oneof![6 => leaf, 1 => lattice];
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Node::Seq),
            proptest::collection::vec(inner.clone(), 1..3).prop_map(Node::Alt),
            (
                inner.clone(),
                prop_oneof![
                    Just((0, None)),
                    Just((1, None)),
                    Just((0, Some(1))),
                    (0u32..3, 0u32..3).prop_map(|(m, n)| (m, Some(m + n))),
                    (0u32..3).prop_map(|m| (m, None)),
                ]
            )
                .prop_map(|(n, (min, max))| Node::Repeat(Box::new(n), min, max)),
            inner.prop_map(|n| Node::Rule(Box::new(n))),
        ]
    })
}

/// A character as GBNF writes it in a string or class.
fn gbnf_char(c: char, out: &mut String, class: bool) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        ']' | '-' | '[' | '^' if class => {
            out.push('\\');
            out.push(c);
        }
        'é' => out.push_str("\\u00e9"),
        c => out.push(c),
    }
}

/// Writes `n` as GBNF into `out`, its rules into `rules`; `gap` is the
/// spacing between items (blanks, a newline inside a group, a comment).
fn gbnf(n: &Node, out: &mut String, rules: &mut Vec<String>, gap: &str) {
    match n {
        Node::Literal(s) => {
            out.push('"');
            s.chars().for_each(|c| gbnf_char(c, out, false));
            out.push('"');
        }
        Node::Class(ranges, neg) => {
            out.push('[');
            if *neg {
                out.push('^');
            }
            for &(a, b) in ranges {
                gbnf_char(a, out, true);
                if a != b {
                    out.push('-');
                    gbnf_char(b, out, true);
                }
            }
            out.push(']');
        }
        Node::Any => out.push('.'),
        Node::Seq(items) => {
            out.push('(');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(gap);
                }
                gbnf(item, out, rules, gap);
            }
            out.push(')');
        }
        Node::Alt(items) => {
            out.push('(');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(" |");
                    out.push_str(gap);
                }
                gbnf(item, out, rules, gap);
            }
            out.push(')');
        }
        Node::Repeat(inner, min, max) => {
            out.push('(');
            gbnf(inner, out, rules, gap);
            out.push(')');
            match (min, max) {
                (0, None) => out.push('*'),
                (1, None) => out.push('+'),
                (0, Some(1)) => out.push('?'),
                (m, None) => out.push_str(&format!("{{{m},}}")),
                (0, Some(n)) => out.push_str(&format!("{{,{n}}}")),
                (m, Some(n)) => out.push_str(&format!("{{ {m} , {n} }}")),
            }
        }
        Node::Rule(inner) => {
            let name = format!("Rule-{}", rules.len());
            rules.push(String::new());
            let at = rules.len() - 1;
            let mut body = String::new();
            gbnf(inner, &mut body, rules, gap);
            rules[at] = format!("{name} ::= {body}");
            out.push_str(&name);
        }
    }
}

fn grammar_text(n: &Node, gap: &str) -> String {
    let mut root = String::new();
    let mut rules = Vec::new();
    gbnf(n, &mut root, &mut rules, gap);
    let mut text = format!("# generated\nroot ::= {root}\n");
    for r in rules {
        text.push_str(&r);
        text.push_str("  # a rule\n");
    }
    text
}

/// The same tree as a regex over whole strings.
fn regex(n: &Node) -> String {
    match n {
        Node::Literal(s) => regex::escape(s),
        Node::Class(ranges, neg) => {
            let mut out = String::from(if *neg { "[^" } else { "[" });
            for &(a, b) in ranges {
                out.push_str(&format!("\\x{{{:x}}}-\\x{{{:x}}}", a as u32, b as u32));
            }
            out.push(']');
            out
        }
        Node::Any => "(?s:.)".into(),
        Node::Seq(items) => items.iter().map(|i| format!("(?:{})", regex(i))).collect(),
        Node::Alt(items) => items
            .iter()
            .map(|i| format!("(?:{})", regex(i)))
            .collect::<Vec<_>>()
            .join("|"),
        Node::Repeat(inner, min, max) => match max {
            Some(m) => format!("(?:{}){{{min},{m}}}", regex(inner)),
            None => format!("(?:{}){{{min},}}", regex(inner)),
        },
        Node::Rule(inner) => regex(inner),
    }
}

/// A string the tree accepts, steered by `choices`.
fn sample(n: &Node, choices: &mut impl Iterator<Item = u8>, out: &mut String) -> bool {
    let mut pick = |k: usize| choices.next().map_or(0, |c| c as usize % k.max(1));
    match n {
        Node::Literal(s) => out.push_str(s),
        Node::Class(ranges, false) => {
            let (a, b) = ranges[pick(ranges.len())];
            let span = b as u32 - a as u32 + 1;
            out.push(char::from_u32(a as u32 + (pick(span as usize) as u32)).unwrap_or(a));
        }
        Node::Class(ranges, true) => {
            match CHARS
                .iter()
                .chain(['x', 'Z', '€'].iter())
                .find(|c| !ranges.iter().any(|&(a, b)| (a..=b).contains(c)))
            {
                Some(&c) => out.push(c),
                None => return false,
            }
        }
        Node::Any => out.push(CHARS[pick(CHARS.len())]),
        Node::Seq(items) => {
            for i in items {
                if !sample(i, choices, out) {
                    return false;
                }
            }
        }
        Node::Alt(items) => {
            let i = pick(items.len());
            return sample(&items[i], choices, out);
        }
        Node::Repeat(inner, min, max) => {
            let extra = pick(3) as u32;
            let times = match max {
                Some(m) => (*min + extra).min(*m),
                None => *min + extra,
            };
            for _ in 0..times {
                if !sample(inner, choices, out) {
                    return false;
                }
            }
        }
        Node::Rule(inner) => return sample(inner, choices, out),
    }
    true
}

fn factory() -> ParserFactory {
    let env = ApproximateTokEnv::single_byte_env();
    let mut f = ParserFactory::new_simple(&env).unwrap();
    f.quiet();
    f
}

/// Whether llguidance, given the grammar's Lark, accepts `text` whole.
fn accepts(f: &ParserFactory, lark: &str, text: &str) -> bool {
    let parser = f
        .create_parser(TopLevelGrammar::from_lark(lark.to_owned()))
        .unwrap_or_else(|e| panic!("{lark}: {e}"));
    let mut m = Matcher::new(Ok(parser));
    let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
    m.consume_tokens(&tokens).is_ok() && m.is_accepting().unwrap_or(false)
}

/// Whether the GBNF grammar, read and compiled, accepts `text` whole.
fn accepts_gbnf(f: &ParserFactory, gbnf: &str, text: &str) -> bool {
    let lark = to_lark(gbnf).unwrap_or_else(|e| panic!("{gbnf}: {e}"));
    accepts(f, &lark, text)
}

/// Cases written by hand, each a way a reader could go wrong.
#[test]
fn llguidance_accepts_what_the_grammar_does() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "root ::= \"yes\" | \"no\"",
            &["yes", "no"],
            &["", "ye", "yesno", "No"],
        ),
        (
            "root ::= (\"a\" | \"ab\") \"bc\"",
            &["abc", "abbc"],
            &["ab", "abcc"],
        ),
        (
            "root ::= [a-z]+ \"ing\"",
            &["running", "xing", "singing"],
            &["ing", "run", "RUNNING"],
        ),
        (
            "root ::= \"x\" \"\" \"y\" empty\nempty ::= ",
            &["xy"],
            &["x"],
        ),
        (
            "root ::= [^\"]* \"\\\"\"",
            &["a\nb\"", "\""],
            &["a", "\"\""],
        ),
        (
            "root ::= . . \"!\"",
            &["ab!", "\n\n!", "éa!"],
            &["a!", "abc!", "é!"],
        ),
        ("root ::= \"a\"{2,3}", &["aa", "aaa"], &["a", "aaaa"]),
        ("root ::= \"a\"{0} \"b\" [a]{,0}", &["b"], &["ab", "ba"]),
        (
            "root ::= \"<\" inner \">\"\ninner ::= (\"<\" inner \">\")*",
            &["<>", "<<><>>"],
            &["<<>", "<>>"],
        ),
    ];
    let f = factory();
    for (gbnf, yes, no) in cases {
        for t in *yes {
            assert!(accepts_gbnf(&f, gbnf, t), "{gbnf:?} should accept {t:?}");
        }
        for t in *no {
            assert!(!accepts_gbnf(&f, gbnf, t), "{gbnf:?} should refuse {t:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
    ))]

    #[test]
    fn any_text_is_read_or_refused(text in "\\PC*", tail in "[ -~\\n]{0,40}") {
        for src in [text.clone(), format!("root ::= {text}"), format!("root ::= \"a\" {tail}")] {
            if let Ok(lark) = to_lark(&src) {
                let _ = factory().create_parser(TopLevelGrammar::from_lark(lark));
            }
        }
    }

    #[test]
    fn a_mangled_grammar_is_read_or_refused(
        tree in node(),
        cut in any::<prop::sample::Index>(),
        insert in proptest::sample::select(&["(", ")", "\"", "[", "]", "{", "}", "::=", "|", "\\", "#", "\n", "{99999}", "<"][..]),
    ) {
        let text = grammar_text(&tree, " ");
        let at = text.char_indices().map(|(i, _)| i).nth(cut.index(text.chars().count())).unwrap_or(0);
        let mangled = format!("{}{insert}{}", &text[..at], &text[at..]);
        if let Ok(lark) = to_lark(&mangled) {
            let _ = factory().create_parser(TopLevelGrammar::from_lark(lark));
        }
    }

    #[test]
    fn the_grammar_accepts_what_its_regex_matches(
        tree in node(),
        gap in proptest::sample::select(&[" ", "  ", "\n  ", " # note\n "][..]),
        steer in proptest::collection::vec(any::<u8>(), 0..64),
        random in proptest::collection::vec(
            proptest::collection::vec(character(), 0..6), 0..6),
    ) {
        let text = grammar_text(&tree, gap);
        let lark = to_lark(&text).unwrap_or_else(|e| panic!("{text}\n{e}"));
        let reference = regex::Regex::new(&format!("^(?:{})$", regex(&tree))).unwrap();
        let f = factory();
        let mut drawn = String::new();
        let mut strings: Vec<String> = random.into_iter().map(|v| v.into_iter().collect()).collect();
        if sample(&tree, &mut steer.into_iter(), &mut drawn) {
            prop_assert!(reference.is_match(&drawn), "the sampler is wrong: {drawn:?} for {tree:?}");
            strings.push(drawn);
        }
        for s in strings {
            prop_assert_eq!(
                accepts(&f, &lark, &s),
                reference.is_match(&s),
                "{:?}\nGBNF:\n{}\nLark:\n{}", s, text, lark
            );
        }
    }
}
