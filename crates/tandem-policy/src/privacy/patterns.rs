//! Recognizers that need no model: a pattern finds candidates, and a check
//! confirms each by its structure (a checksum, a valid date, a valid phone
//! number for its country) and the words around it (a passport number is a
//! number near the word "passport"). The checks are what keep version
//! strings, order numbers, dates and code out.
//!
//! Patterns run on text whose digits were folded to ASCII (see
//! `normalize`), and every check is total: no input makes one panic.

use regex::{Captures, Regex};

use super::context::{
    self, BIRTH, MEDICAL, NOT_PERSONAL, PASSPORT, PHONE, contains_word, entropy, near,
};

/// A match a recognizer confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Its class.
    pub class: String,
    /// Byte offset where it starts.
    pub start: usize,
    /// Byte offset where it ends.
    pub end: usize,
    /// Which wins when two hits overlap: higher first.
    pub priority: u8,
}

/// Confirms a match; returns the span to keep (a capture group, or the whole
/// match), or `None`.
type Check = fn(&str, &Captures) -> Option<(usize, usize)>;

struct Rule {
    class: &'static str,
    regex: Regex,
    check: Check,
    priority: u8,
}

/// The whole match.
fn whole(_: &str, c: &Captures) -> Option<(usize, usize)> {
    c.get(0).map(|m| (m.start(), m.end()))
}

/// Capture group 1.
fn group(_: &str, c: &Captures) -> Option<(usize, usize)> {
    c.get(1).map(|m| (m.start(), m.end()))
}

fn span(c: &Captures) -> (usize, usize) {
    c.get(0).map_or((0, 0), |m| (m.start(), m.end()))
}

/// Whether the match is glued to a longer token (`abc-123`, `v1.2`,
/// `x_42`): then it is part of an identifier, not a number on its own.
/// A label's colon is not glue: `SSN:123-45-6789`, `tel:+44…`,
/// `Name:Jane Doe` are how forms, logs and URIs write personal data.
pub(super) fn glued(text: &str, s: usize, e: usize) -> bool {
    let before = text[..s].chars().next_back();
    let before2 = text[..s].chars().rev().nth(1);
    let after = text[e..].chars().next();
    let after2 = text[e..].chars().nth(1);
    let joiner = |c: Option<char>| matches!(c, Some('-' | '_' | '.' | '/' | ':'));
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    let labelled = before == Some(':') && before2.is_some_and(char::is_alphabetic);
    joiner(before) && word(before2) && !labelled || joiner(after) && word(after2)
}

/// Whether the match is one group of a longer run of digit groups (a card,
/// a tracking number): the regex stopped at its length limit, not at the
/// number's end.
fn in_digit_run(text: &str, s: usize, e: usize) -> bool {
    let digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
    text[e..]
        .strip_prefix(' ')
        .is_some_and(|t| digit(t.chars().next()))
        || text[..s]
            .strip_suffix(' ')
            .is_some_and(|t| digit(t.chars().next_back()))
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

fn luhn(d: &[u32]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A payment card: a known issuer prefix, a card length, the Luhn check,
/// and no word saying it is a shipment or an order.
fn card(text: &str, c: &Captures) -> Option<(usize, usize)> {
    best_part(text, span(c), &[' ', '-'], |s, e| is_card(text, s, e))
}

fn is_card(text: &str, s: usize, e: usize) -> bool {
    if glued(text, s, e) {
        return false;
    }
    let d = digits(&text[s..e]);
    let n = d.len();
    let prefix = |k: usize| d.iter().take(k).fold(0u32, |a, &x| a * 10 + x);
    let Some(first) = d.first() else {
        return false;
    };
    let issuer = match first {
        4 => matches!(n, 13 | 16 | 19),
        5 => (51..=55).contains(&prefix(2)) && n == 16,
        2 => (2221..=2720).contains(&prefix(4)) && n == 16,
        3 => {
            matches!(prefix(2), 34 | 37) && n == 15
                || matches!(prefix(2), 36 | 38 | 39) && (14..=19).contains(&n)
                || (300..=305).contains(&prefix(3)) && (14..=19).contains(&n)
                || (3528..=3589).contains(&prefix(4)) && (16..=19).contains(&n)
        }
        6 => {
            (prefix(4) == 6011
                || prefix(2) == 65
                || (644..=649).contains(&prefix(3))
                || prefix(2) == 62)
                && (16..=19).contains(&n)
        }
        _ => false,
    };
    issuer
        && luhn(&d)
        && !near(text, s, e, NOT_PERSONAL, 40, 0)
        && !labelled(
            text.get(context::floor_boundary(text, s.saturating_sub(LABEL_REACH))..s)
                .unwrap_or(""),
            OTHER_NUMBERS,
        )
}

/// How far before a number its label is looked for, in bytes: the longest
/// label with "number" and its punctuation, with room to spare, so that a
/// long text is not lowercased whole for every card-like number in it.
const LABEL_REACH: usize = 48;

/// Labels that name a number as something other than a card: one in ten
/// order numbers of a card's length passes the Luhn check.
const OTHER_NUMBERS: &[&str] = &[
    "order",
    "invoice",
    "booking",
    "reservation",
    "confirmation",
    "ticket",
    "reference",
    "ref",
    "bestellung",
    "commande",
    "pedido",
    "ordine",
    "zamówienie",
];

/// Whether the text just before a number ends with one of `labels` (then
/// perhaps "number", "no.", "#", ":"): `order 4454 …`, `Order no. 4454 …`.
fn labelled(before: &str, labels: &[&str]) -> bool {
    let trim = |t: &str| -> String {
        t.trim_end_matches(|c: char| c.is_whitespace() || "#:.-\u{2013}".contains(c))
            .to_lowercase()
    };
    let mut b = trim(before);
    for w in [
        "number", "numbers", "nummer", "numéro", "número", "numero", "no", "nr", "num", "id",
    ] {
        if let Some(rest) = b.strip_suffix(w)
            && !rest.ends_with(char::is_alphanumeric)
        {
            b = trim(rest);
            break;
        }
    }
    labels.iter().any(|l| {
        b.strip_suffix(l)
            .is_some_and(|rest| !rest.ends_with(char::is_alphanumeric))
    })
}

fn iban(text: &str, c: &Captures) -> Option<(usize, usize)> {
    best_part(text, span(c), &[' ', '-'], |s, e| is_iban(&text[s..e]))
}

/// IBAN lengths by country (the SWIFT registry), for the forms that are not
/// the printed one.
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NL", 18),
    ("NO", 15),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("SA", 24),
    ("SC", 31),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
];

fn is_iban(part: &str) -> bool {
    let compact: String = part
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect();
    // Written in lower case or with dashes (typed, not printed), it must
    // also be of a country that has IBANs, and be grouped in fours as
    // IBANs are or have that country's length: a lower-case hex identifier
    // (a digest, a UUID) passes the checksum one time in 97.
    let printed = !part.contains('-') && !part.chars().any(|c| c.is_ascii_lowercase());
    let groups: Vec<&str> = part.split([' ', '-']).collect();
    let in_fours = groups.len() > 1
        && groups.split_last().is_some_and(|(last, full)| {
            full.iter().all(|g| g.len() == 4) && (1..=4).contains(&last.len())
        });
    let compact = compact.to_ascii_uppercase();
    let country = matches!(compact.as_bytes(), [a, b, c, d, ..]
        if a.is_ascii_uppercase() && b.is_ascii_uppercase() && c.is_ascii_digit() && d.is_ascii_digit());
    if !country || !(15..=34).contains(&compact.len()) || !compact.is_ascii() {
        return false;
    }
    if !printed
        && !IBAN_LENGTHS
            .iter()
            .any(|&(cc, n)| compact.starts_with(cc) && (in_fours || compact.len() == n))
    {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for ch in tail.chars().chain(head.chars()) {
        let v = match ch {
            '0'..='9' => ch as u32 - '0' as u32,
            'A'..='Z' => ch as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        if v >= 10 {
            rem = (rem * 100 + v) % 97;
        } else {
            rem = (rem * 10 + v) % 97;
        }
    }
    rem == 1
}

/// The longest part of a match (then the leftmost) made of its whole
/// groups, between the separators `sep`, that `ok` accepts. A greedy
/// pattern runs on into the groups beside a number — an expiry date after
/// a card, a BIC or a word in capitals after an IBAN, an order number
/// before it — and the checksum then fails for the whole run while it
/// holds for the number in it.
fn best_part(
    text: &str,
    (s, e): (usize, usize),
    sep: &[char],
    ok: impl Fn(usize, usize) -> bool,
) -> Option<(usize, usize)> {
    let (mut starts, mut ends) = (vec![s], vec![e]);
    for (i, ch) in text.get(s..e)?.char_indices() {
        if sep.contains(&ch) {
            ends.push(s + i);
            starts.push(s + i + ch.len_utf8());
        }
    }
    let mut parts: Vec<(usize, usize)> = starts
        .iter()
        .flat_map(|&a| ends.iter().filter(move |&&b| b > a).map(move |&b| (a, b)))
        .collect();
    parts.sort_by_key(|&(a, b)| (std::cmp::Reverse(b - a), a));
    parts.into_iter().find(|&(a, b)| ok(a, b))
}

/// US social security number: not in the ranges never issued.
fn ssn(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = span(c);
    if glued(text, s, e) {
        return None;
    }
    let d = digits(&text[s..e]);
    if d.len() != 9 {
        return None;
    }
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    let plain = !text[s..e].contains(['-', ' ']);
    let valid = area != 0 && area != 666 && area < 900 && group != 0 && serial != 0;
    // Nine bare digits are an SSN only when something says so.
    (valid && (!plain || near(text, s, e, &["ssn", "social security"], 40, 0))).then_some((s, e))
}

/// Spanish DNI and NIE: the control letter.
fn dni(text: &str, c: &Captures) -> Option<(usize, usize)> {
    const LETTERS: &[u8] = b"TRWAGMYFPDXBNJZSQVHLCKE";
    let (s, e) = span(c);
    let v = text.get(s..e)?.as_bytes();
    let (num, letter) = v.split_at(v.len().checked_sub(1)?);
    let lead = match num.first()? {
        b'X' => Some(0),
        b'Y' => Some(1),
        b'Z' => Some(2),
        b'0'..=b'9' => None,
        _ => return None,
    };
    let digits = if lead.is_some() { &num[1..] } else { num };
    let mut n: u64 = lead.unwrap_or(0);
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    (LETTERS.get((n % 23) as usize) == letter.first()).then_some((s, e))
}

/// Polish PESEL: the check digit and a real date of birth.
fn pesel(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = span(c);
    if glued(text, s, e) {
        return None;
    }
    let d = digits(&text[s..e]);
    if d.len() != 11 {
        return None;
    }
    const W: [u32; 10] = [1, 3, 7, 9, 1, 3, 7, 9, 1, 3];
    let sum: u32 = d.iter().zip(W).map(|(a, b)| a * b).sum();
    let month = (d[2] * 10 + d[3]) % 20;
    let day = d[4] * 10 + d[5];
    let ok = (10 - sum % 10) % 10 == d[10] && (1..=12).contains(&month) && (1..=31).contains(&day);
    (ok && !near(text, s, e, NOT_PERSONAL, 40, 0)).then_some((s, e))
}

/// French social security number (NIR): its key.
fn nir(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = span(c);
    let compact: String = text[s..e].chars().filter(|c| !c.is_whitespace()).collect();
    if compact.len() != 15 {
        return None;
    }
    // Corsica: 2A / 2B count as 19 / 18 in the key.
    let body = compact[..13].replace("2A", "19").replace("2B", "18");
    let n: u64 = body.parse().ok()?;
    let key: u64 = compact[13..].parse().ok()?;
    (97 - n % 97 == key).then_some((s, e))
}

/// Indian Aadhaar: the Verhoeff check digit.
fn aadhaar(text: &str, c: &Captures) -> Option<(usize, usize)> {
    const D: [[usize; 10]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
        [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
        [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
        [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
        [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
        [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ];
    const P: [[usize; 10]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
        [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
        [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
        [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
        [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ];
    let (s, e) = span(c);
    let d = digits(&text[s..e]);
    if d.len() != 12 || glued(text, s, e) || in_digit_run(text, s, e) {
        return None;
    }
    let mut check = 0;
    for (i, &x) in d.iter().rev().enumerate() {
        check = D[check][P[i % 8][x as usize]];
    }
    (check == 0
        && (!text[s..e].contains(' ')
            || near(text, s, e, &["aadhaar", "aadhar", "uid"], 40, 0)
            || !near(text, s, e, PHONE, 30, 0)))
    .then_some((s, e))
}

/// UK NHS number: the mod-11 check, with its name nearby.
fn nhs(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = span(c);
    if glued(text, s, e) {
        return None;
    }
    let d = digits(&text[s..e]);
    if d.len() != 10 {
        return None;
    }
    let sum: u32 = d[..9]
        .iter()
        .enumerate()
        .map(|(i, &x)| x * (10 - i as u32))
        .sum();
    let check = (11 - sum % 11) % 11;
    (check != 10 && check == d[9] && near(text, s, e, &["nhs"], 40, 0)).then_some((s, e))
}

/// A number next to the words that name what it is.
fn with_words(
    words: &'static [&'static str],
) -> impl Fn(&str, &Captures) -> Option<(usize, usize)> {
    move |text, c| {
        let (s, e) = group(text, c)?;
        (digits(&text[s..e]).len() >= 4 && near(text, s, e, words, 45, 0)).then_some((s, e))
    }
}

fn passport(text: &str, c: &Captures) -> Option<(usize, usize)> {
    with_words(PASSPORT)(text, c)
}

fn medical(text: &str, c: &Captures) -> Option<(usize, usize)> {
    with_words(MEDICAL)(text, c)
}

fn tax_id(text: &str, c: &Captures) -> Option<(usize, usize)> {
    with_words(&[
        "steuer-id",
        "steuerid",
        "steueridentifikationsnummer",
        "identifikationsnummer",
        "tax id",
        "tin",
        "sozialversicherungsnummer",
        "rentenversicherungsnummer",
        "svnr",
        "personalausweis",
        "ausweisnummer",
        "national id",
        "id number",
        "id card",
        "identity card",
        "carte d'identité",
        "numéro fiscal",
        "documento",
        "carta d'identità",
        "dowód",
        "nip",
        "pan",
    ])(text, c)
}

/// An IPv4 address that is not a version number or part of a longer dotted
/// sequence.
/// Words of a `key=` that names a network address.
const ADDRESS_KEYS: &[&str] = &[
    "ip",
    "ipv4",
    "addr",
    "address",
    "host",
    "hostname",
    "server",
    "client",
    "peer",
    "remote",
    "src",
    "dst",
    "source",
    "dest",
    "gateway",
    "gw",
    "dns",
    "nameserver",
    "proxy",
    "router",
];

fn ipv4(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = span(c);
    let before = &text[..s];
    let after = &text[e..];
    // `pkg=1.2.3.4` pins a version, but `ip=`, `host=`, `remote_addr=` name
    // an address: the key decides.
    let assigned = before.strip_suffix('=').is_some_and(|k| {
        let key = k
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let words = key.split(['_', '-']).collect::<Vec<_>>();
        !(words.iter().any(|w| ADDRESS_KEYS.contains(w))
            || key.ends_with("ip")
            || key.ends_with("addr"))
    });
    let glued_before = before.ends_with(['.', '-', '_', '@', 'v', 'V', '/'])
        || assigned
        || before.ends_with("==")
        || before.trim_end().to_lowercase().ends_with("version");
    let glued_after = after.starts_with('.')
        && after[1..].starts_with(|c: char| c.is_ascii_digit())
        || after.starts_with(['-', '_'])
            && after[1..].starts_with(|c: char| c.is_ascii_alphanumeric());
    // A version word earlier in the same sentence: "upgrade to version
    // 10.2.0.1 fixed it; 10.1.4.7 still has it" names two versions.
    let lo = context::floor_boundary(text, s.saturating_sub(120));
    let sentence = text[lo..s]
        .rfind(['\n', '!', '?'])
        .into_iter()
        .chain(text[lo..s].rfind(". "))
        .max()
        .map_or(lo, |i| lo + i + 1);
    let versiony = contains_word(
        &text[sentence..s].to_lowercase(),
        &[
            "version",
            "release",
            "v",
            "ver",
            "build",
            "firmware",
            "update to",
            "upgrade to",
        ],
    );
    (!glued_before && !glued_after && !versiony).then_some((s, e))
}

fn ipv6(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = span(c);
    let edge =
        |ch: Option<char>| ch.is_some_and(|c| c.is_ascii_alphanumeric() || c == ':' || c == '_');
    if edge(text[..s].chars().next_back()) || edge(text[e..].chars().next()) {
        return None;
    }
    let v = &text[s..e];
    (v.parse::<std::net::Ipv6Addr>().is_ok() && v.matches(':').count() >= 2 && v.len() >= 6)
        .then_some((s, e))
}

/// A date near a word that says it is a birthday.
fn birth_date(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = span(c);
    near(text, s, e, BIRTH, 60, 25).then_some((s, e))
}

/// A value assigned to a key that names a secret, unless it is code (a call,
/// a reference to another variable) or a placeholder.
fn keyed_secret(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let key = c.get(1)?.as_str().to_lowercase();
    let v = c.get(2)?;
    let value = v.as_str();
    let passwordish = ["pass", "pwd", "passphrase"]
        .iter()
        .any(|k| key.contains(k));
    let code_like = value.contains(['(', ')', '[', ']', '{', '}', '<', '>', '$'])
        || value.starts_with("self.")
        || value.starts_with("this.")
        || value.starts_with("os.")
        || value.starts_with("process.")
        || value.starts_with("env")
        || value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        || value.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        || value.split('.').count() > 1
            && value
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            && !value.chars().any(|c| c.is_ascii_digit());
    let placeholder = [
        "xxx", "***", "your", "<", "changeme", "example", "redacted", "none", "null",
    ]
    .iter()
    .any(|p| value.to_lowercase().contains(p));
    let strong = value.len() >= 12
        && entropy(value) >= 3.0
        && value.chars().any(|c| c.is_ascii_digit())
        && value.chars().any(char::is_alphabetic);
    let ok = !code_like && !placeholder && (strong || passwordish && value.chars().count() >= 6);
    let _ = text;
    ok.then_some((v.start(), v.end()))
}

/// An AWS secret access key: 40 base64 characters, near a word that says
/// so, or random-looking enough on its own.
fn aws_secret(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = c.get(1).map_or_else(|| span(c), |m| (m.start(), m.end()));
    let base64 = |ch: char| ch.is_ascii_alphanumeric() || ch == '/' || ch == '+' || ch == '=';
    // `=` before it assigns it (`AWS_SECRET_ACCESS_KEY=...`); after it, it
    // would pad a longer string.
    if text[..s]
        .chars()
        .next_back()
        .is_some_and(|ch| ch != '=' && base64(ch))
        || text[e..].chars().next().is_some_and(base64)
    {
        return None;
    }
    let v = &text[s..e];
    let cased =
        v.chars().any(|c| c.is_ascii_uppercase()) && v.chars().any(|c| c.is_ascii_lowercase());
    let mixed = cased && v.chars().any(|c| c.is_ascii_digit());
    let said = near(
        text,
        s,
        e,
        &["aws", "secret", "access key", "secret_access_key"],
        60,
        0,
    );
    // One key in a thousand has no digit; named as a key, it is one still.
    (mixed && (said || entropy(v) >= 4.3) || cased && said && entropy(v) >= 4.0).then_some((s, e))
}

/// The part of `text[s..e]` that is a phone number's digits, when the
/// span has a phone number's shape: 7 to 15 digits, not glued to a longer
/// token, not one group of a longer run of digit groups, not a date, and
/// not next to words that say it is something else. An extension ("x6949",
/// "ext. 12") belongs to the number but is not part of what is validated.
pub(super) fn phone_shape(text: &str, s: usize, e: usize) -> Option<&str> {
    static EXTENSION: std::sync::OnceLock<Option<Regex>> = std::sync::OnceLock::new();
    static DATE: std::sync::OnceLock<Option<Regex>> = std::sync::OnceLock::new();
    let span = text.get(s..e)?;
    let number_end = EXTENSION
        .get_or_init(|| Regex::new(r"\s?(?:x|ext\.?|#)\s?\d{1,6}$").ok())
        .as_ref()
        .and_then(|r| r.find(span))
        .map_or(e, |m| s + m.start());
    let raw = text.get(s..number_end)?;
    if !(7..=15).contains(&digits(raw).len()) {
        return None;
    }
    // Glued to a longer token: a letter, digit or underscore right next to
    // it, or a dot or slash that goes on into one ("v2.0", "/api/5551234");
    // a sentence's full stop is not glue.
    let word = |ch: Option<char>| ch.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let joiner = |ch: Option<char>| matches!(ch, Some('.' | '/'));
    let b1 = text[..s].chars().next_back();
    let mut after = text[e..].chars();
    let (a1, a2) = (after.next(), after.next());
    if word(b1) || word(a1) || joiner(b1) || joiner(a1) && word(a2) || glued(text, s, e) {
        return None;
    }
    if in_digit_run(text, s, e) {
        return None;
    }
    let date = DATE
        .get_or_init(|| Regex::new(r"^\d{1,4}[./-]\d{1,2}[./-]\d{1,4}$").ok())
        .as_ref();
    if date.is_some_and(|r| r.is_match(raw.trim())) {
        return None;
    }
    if near(text, s, e, NOT_PERSONAL, 40, 0) && !near(text, s, e, PHONE, 40, 0) {
        return None;
    }
    Some(raw)
}

/// A phone number: a valid number for its country (libphonenumber's rules),
/// written as people write phone numbers — with a country code, or with the
/// usual separators, or next to a word that says it is a phone number.
fn phone(text: &str, c: &Captures) -> Option<(usize, usize)> {
    use phonenumber::country::Id;
    let (s, e) = span(c);
    let raw = phone_shape(text, s, e)?;
    let international = raw.starts_with('+') || raw.starts_with("00");
    let formatted = raw.contains([' ', '-', '(', ')']) || raw.matches('.').count() >= 2;
    let said = near(text, s, e, PHONE, 40, 0);
    let valid = if international {
        let cleaned = raw.replacen("00", "+", usize::from(raw.starts_with("00")));
        phonenumber::parse(None, &cleaned).is_ok_and(|n| phonenumber::is_valid(&n))
    } else {
        [
            Id::US,
            Id::GB,
            Id::DE,
            Id::FR,
            Id::IN,
            Id::ES,
            Id::IT,
            Id::PL,
            Id::NL,
            Id::CA,
            Id::AU,
        ]
        .iter()
        .any(|&id| phonenumber::parse(Some(id), raw).is_ok_and(|n| phonenumber::is_valid(&n)))
    };
    // A number introduced as a phone number is one, valid or not (a typo,
    // a made-up number in a test account): strict privacy errs this way.
    let plausible = said && digits(raw).len() >= 8;
    (valid && (international || formatted || said) || plausible).then_some((s, e))
}

/// Person-name phrases the model might miss: "my name is ...", titles.
fn person(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let (s, e) = group(text, c)?;
    let name = &text[s..e];
    // Not a sentence's next word: each part a capitalised word of letters.
    let ok = name
        .split_whitespace()
        .all(|w| w.chars().next().is_some_and(char::is_uppercase) && w.chars().count() >= 2);
    ok.then_some((s, e))
}

/// A name after one or more titles: the name checked as in [`person`], the
/// titles kept with it.
fn titled(text: &str, c: &Captures) -> Option<(usize, usize)> {
    let name = c.get(2)?;
    let ok = name
        .as_str()
        .split_whitespace()
        .all(|w| w.chars().next().is_some_and(char::is_uppercase) && w.chars().count() >= 2);
    ok.then_some(group(text, c)?)
}

fn rules() -> Vec<(&'static str, std::borrow::Cow<'static, str>, Check, u8)> {
    const MONTHS: &str = "january|february|march|april|may|june|july|august|september|october|november|december|jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|januar|februar|märz|maerz|mai|juni|juli|oktober|dezember|janvier|février|fevrier|mars|avril|juin|juillet|août|aout|septembre|octobre|novembre|décembre|decembre|enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|setiembre|octubre|noviembre|diciembre|gennaio|febbraio|aprile|maggio|giugno|luglio|settembre|ottobre|dicembre|stycznia|lutego|marca|kwietnia|maja|czerwca|lipca|sierpnia|września|wrzesnia|października|pazdziernika|listopada|grudnia|styczeń|luty|marzec|kwiecień|maj|czerwiec|lipiec|sierpień|wrzesień|październik|listopad|grudzień";
    let textual_1 = format!(
        r"(?i)\b\d{{1,2}}(?:st|nd|rd|th|er|\.|º)?\s*(?:of\s+|de\s+)?(?:{MONTHS})\.?,?\s*(?:de\s+|del\s+)?\d{{4}}\b"
    );
    let textual_2 = format!(r"(?i)\b(?:{MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b");
    let rules: Vec<(&'static str, &'static str, Check, u8)> = vec![
        // Secrets first: a key may look like other things.
        (
            "secret",
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
            whole,
            9,
        ),
        (
            "secret",
            r"\b(?:sk-(?:proj-|ant-(?:api\d\d-)?|svcacct-)?[A-Za-z0-9_-]{20,}|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}|(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}|xox[abprse]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20,}|hf_[A-Za-z]{30,}|npm_[A-Za-z0-9]{36}|SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}|pypi-[A-Za-z0-9_-]{50,})",
            whole,
            9,
        ),
        (
            "secret",
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
            whole,
            9,
        ),
        (
            "secret",
            r"\b[a-z][a-z0-9+.-]{1,15}://[^\s:/@]{1,64}:([^\s@/]{3,128})@",
            group,
            8,
        ),
        (
            "secret",
            r"(?i)\bbearer\s+([A-Za-z0-9._~+/=-]{16,})",
            group,
            8,
        ),
        // Not `\b`: a key may start with `+` or `/`, where there is none.
        (
            "secret",
            r"(?:^|[^A-Za-z0-9/+])([A-Za-z0-9/+]{40})",
            aws_secret,
            7,
        ),
        (
            "secret",
            r#"(?i)\b([a-z0-9_.-]*?(?:password|passwd|passwort|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|client[_-]?secret|auth[_-]?token|credentials?|passphrase)[a-z0-9_-]*)["']?\s*(?::|=|=>|:=)\s*["']?([^\s"'`,;)}\]]{6,})"#,
            keyed_secret,
            7,
        ),
        (
            "email",
            r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            whole,
            6,
        ),
        (
            // Written to dodge scrapers: `jane.doe(at)example.com`,
            // `jane.doe [at] example [dot] com`. Only the bracketed words:
            // a bare "at" is prose.
            "email",
            r"(?i)\b[a-z0-9._%+-]+ ?[(\[{<]at[)\]}>] ?[a-z0-9-]+(?:(?:\.| ?[(\[{<]dot[)\]}>] ?)[a-z0-9-]+)*(?:\.| ?[(\[{<]dot[)\]}>] ?)[a-z]{2,}\b",
            whole,
            6,
        ),
        (
            "iban",
            r"\b[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}\b",
            iban,
            6,
        ),
        ("card_number", r"\b\d(?:[ -]?\d){12,18}\b", card, 5),
        (
            "national_id",
            r"\b\d{3}[- ]\d{2}[- ]\d{4}\b|\b\d{9}\b",
            ssn,
            5,
        ),
        (
            "national_id",
            r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b",
            whole,
            5,
        ),
        (
            "national_id",
            r"\b(?:\d{8}|[XYZ]\d{7})[A-HJ-NP-TV-Z]\b",
            dni,
            5,
        ),
        ("national_id", r"\b\d{11}\b", pesel, 4),
        (
            "national_id",
            r"\b[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}\b",
            nir,
            5,
        ),
        (
            "national_id",
            r"\b[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]\b",
            whole,
            5,
        ),
        ("national_id", r"\b[2-9]\d{3} ?\d{4} ?\d{4}\b", aadhaar, 4),
        (
            "national_id",
            r"\b[A-Z]{3}[ABCFGHLJPT][A-Z]\d{4}[A-Z]\b",
            whole,
            4,
        ),
        (
            "national_id",
            r"(?i:\b(?:steuer-?id|steueridentifikationsnummer|identifikationsnummer|tax id|tin|sozialversicherungsnummer|rentenversicherungsnummer|svnr|personalausweis|ausweisnummer|national id|id number|id card|identity card|documento|dowód|nip|pan)\b)[^\n]{0,30}?\b([A-Z0-9][A-Z0-9 -]{4,18}[A-Z0-9])\b",
            tax_id,
            4,
        ),
        ("medical_record", r"\b\d{3} ?\d{3} ?\d{4}\b", nhs, 5),
        (
            "medical_record",
            r"(?i:\b(?:mrn|medical record(?: number| no\.?| #)?|patient(?: id| number| no\.?| #)|hospital number|chart number|health record(?: number)?|patientennummer|patienten-?id|krankenakte|numéro de dossier|numéro patient|historia clínica|n[úu]mero de historia|cartella clinica|numero paziente|numer pacjenta|numer historii)\b)[^\n]{0,25}?\b([A-Z]{0,4}-?\d[\dA-Z-]{3,14}[\dA-Z])\b",
            medical,
            4,
        ),
        (
            "passport",
            r"(?i:\b(?:passport|reisepass|pass-?nr\.?|passnummer|passeport|pasaporte|passaporto|paszport|pasport|travel document)[a-z_]*)[^\n]{0,35}?\b([A-Z0-9]{1,3}[0-9][A-Z0-9]{4,9})\b",
            passport,
            4,
        ),
        (
            "ip_address",
            r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b",
            ipv4,
            3,
        ),
        (
            "ip_address",
            r"(?i)[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}",
            ipv6,
            3,
        ),
        (
            "date_of_birth",
            r"\b(?:\d{1,2}[./-]\d{1,2}[./-](?:\d{4}|\d{2})|\d{4}[./-]\d{1,2}[./-]\d{1,2})\b",
            birth_date,
            3,
        ),
        (
            "phone",
            r"(?:\+|\b00)?\(?\d[\d ().\-/]{5,22}\d(?:\s?(?:x|ext\.?|#)\s?\d{1,6}\b)?",
            phone,
            2,
        ),
        (
            "person",
            r"\b(?i:my name is|my name's|i am|i'm|this is|name:|called|ich heiße|ich heisse|mein name ist|je m'appelle|je suis|me llamo|mi nombre es|mi chiamo|nazywam się|mam na imię)\s+([\p{Lu}][\p{L}'-]+(?:\s+[\p{Lu}][\p{L}'-]+){0,2})",
            person,
            1,
        ),
        // Titles belong to the name they introduce ("Prof. Dr. Anna Weber");
        // those written in lower case mid-sentence ("do pan Adam Wyskiel",
        // "à madame Claire Petit", "an Herrn Jan Roth") in any case, but
        // without a full stop, which would make "in a pan. Then" a name.
        // Narrower than entities.rs's `TITLES` (which only extend a name
        // found otherwise): here the title alone makes the name.
        (
            "person",
            r"\b((?:(?:(?:Mr|Mrs|Ms|Miss|Dr|Prof|Univ\.-?Prof|Dipl\.-Ing|Herr|Frau|M\.|Mme|Mlle|Sr|Sra|Srta|Sig|Sig\.ra)\.?|(?i:pan|pani|panna|herrn|monsieur|madame|mademoiselle|señor|señora|señorita|signor|signora|signorina|dott\.ssa|dott\.))\s+)+([\p{Lu}][\p{L}'-]+(?:\s+[\p{Lu}][\p{L}'-]+){0,2}))",
            titled,
            1,
        ),
        (
            "address",
            r"\b\d{1,5}[A-Za-z]?,?\s+(?:[\p{Lu}][\p{L}'.-]*\s+){1,4}(?:Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Boulevard|Blvd\.?|Lane|Ln\.?|Drive|Dr\.?|Court|Ct\.?|Way|Place|Pl\.?|Terrace|Parkway|Pkwy\.?|Circle|Close|Crescent|Gardens|Grove|Mews|Square|Hill|Park|Row|Walk)\b(?:,?\s+(?:Apt\.?|Suite|Unit|Flat|#)\s*[\w-]+)?",
            whole,
            1,
        ),
        (
            "address",
            r"\b[\p{Lu}][\p{L}-]*(?:straße|strasse|str\.|weg|platz|allee|gasse|ring|damm|ufer|chaussee)\s+\d{1,4}\s?[a-z]?\b",
            whole,
            1,
        ),
        (
            "address",
            r"(?i:\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|av\.|boulevard|bd|place|chemin|allée|allee|impasse|quai|route|cours)\s+(?:de\s+la\s+|de\s+l'|du\s+|des\s+|de\s+|d')?)[\p{L}'-]+(?:\s+[\p{Lu}][\p{L}'-]+){0,3}",
            whole,
            1,
        ),
        (
            "address",
            r"(?:\b(?:Calle|C/|Avenida|Avda\.|Av\.|Plaza|Pza\.|Paseo|Camino|Carrera|Ronda|Travesía|Via|Viale|Piazza|Piazzale|Corso|Vicolo|Largo|Strada|Contrada|ul\.|al\.|pl\.|os\.|ulica|aleja)\s+(?:de\s+la\s+|de\s+los\s+|de\s+las\s+|del\s+|de\s+)?)[\p{Lu}][\p{L}'.-]*(?:\s+[\p{Lu}][\p{L}'.-]*){0,3},?\s+(?:n\.?\s?º?\s?)?\d{1,4}[A-Za-z]?(?:/\d{1,4})?",
            whole,
            1,
        ),
        (
            "address",
            r"\b[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2}\b",
            whole,
            1,
        ),
        ("address", r"\b\d{2}-\d{3}\s+[\p{Lu}][\p{L}-]+\b", whole, 1),
        // Military post, as the US Postal Service writes it: a unit, PSC or
        // CMR and a box, or a ship, then APO/FPO/DPO, AA/AE/AP and a ZIP
        // code ("Unit 9341 Box 8445, DPO AE 53621", "USNS Comfort, FPO AA
        // 34058"). The model reads none of it as an address; so specific a
        // shape outranks the phone number its ZIP+4 would otherwise be.
        (
            "address",
            r"(?:\b(?:(?i:unit|psc|cmr)\s+\d{1,5},?\s+(?i:box)\s+\d{1,5}|(?:USNS|USNV|USS|USCGC)\s+[\p{Lu}][\p{L}'-]*(?:\s+[\p{Lu}][\p{L}'-]*){0,2}),?\s+)?\b(?:APO|FPO|DPO)\s+(?:AA|AE|AP)\s+\d{5}(?:-\d{4})?\b",
            whole,
            3,
        ),
    ];
    let mut out: Vec<(&'static str, std::borrow::Cow<'static, str>, Check, u8)> = rules
        .into_iter()
        .map(|(c, r, f, p)| (c, std::borrow::Cow::Borrowed(r), f, p))
        .collect();
    out.push(("date_of_birth", textual_1.into(), birth_date, 3));
    out.push(("date_of_birth", textual_2.into(), birth_date, 3));
    out
}

/// The recognizers, compiled once.
pub struct Patterns {
    rules: Vec<Rule>,
    custom: Vec<(String, Regex)>,
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patterns")
            .field("rules", &self.rules.len())
            .field("custom", &self.custom.len())
            .finish()
    }
}

impl Patterns {
    /// The built-in recognizers plus `custom` (class name, regex).
    pub fn new(custom: &[(String, String)]) -> Result<Patterns, String> {
        let mut compiled = Vec::new();
        for (class, re, check, priority) in rules() {
            compiled.push(Rule {
                class,
                regex: Regex::new(&re).map_err(|e| format!("built-in pattern {class}: {e}"))?,
                check,
                priority,
            });
        }
        let custom = custom
            .iter()
            .map(|(name, re)| {
                Regex::new(re)
                    .map(|r| (name.clone(), r))
                    .map_err(|e| format!("custom PII pattern `{name}`: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Patterns {
            rules: compiled,
            custom,
        })
    }

    /// Every confirmed match in `text` (overlaps resolved later).
    pub fn find(&self, text: &str) -> Vec<Hit> {
        let mut out = Vec::new();
        for rule in &self.rules {
            let mut at = 0;
            while let Some(c) = rule.regex.captures_at(text, at) {
                let Some(m) = c.get(0) else { break };
                let confirmed =
                    (rule.check)(text, &c).filter(|&(start, end)| start < end && end <= text.len());
                if let Some((start, end)) = confirmed {
                    out.push(Hit {
                        class: rule.class.to_owned(),
                        start,
                        end,
                        priority: rule.priority,
                    });
                }
                // A candidate that confirmed nothing may have swallowed the
                // start of a real one: `345345 5500 0000 0000 0004` matches
                // the card pattern as its first 18 digits, and the card
                // after the six is cut off by that match's end. Search again
                // from its next word, not from its end.
                at = match confirmed {
                    Some(_) => m.end(),
                    None => next_word(text, m.start(), m.end()),
                };
                if at <= m.start() {
                    at = m.end().max(m.start() + 1);
                }
                if at > text.len() {
                    break;
                }
                at = context::ceil_boundary(text, at);
            }
        }
        for (name, re) in &self.custom {
            for m in re.find_iter(text) {
                if m.start() < m.end() {
                    out.push(Hit {
                        class: name.clone(),
                        start: m.start(),
                        end: m.end(),
                        priority: 10,
                    });
                }
            }
        }
        out
    }
}

/// Where the word after the one at `start` begins, within `start..end`
/// (after a space or a hyphen); `end` when there is none.
fn next_word(text: &str, start: usize, end: usize) -> usize {
    text.get(start..end)
        .and_then(|m| m.find([' ', '-', '\u{a0}']))
        .map_or(end, |i| start + i + 1)
}
