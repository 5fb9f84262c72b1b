//! From the model's labelled spans to findings: which labels count, how
//! parts join into one name or one address, and which lone parts are not
//! personal data on their own.
//!
//! The model is taken for what patterns cannot see — person names and
//! street addresses — and for phone numbers that libphonenumber would not
//! call valid but people write anyway ("(0161) 496 0034"), when the span
//! has a phone number's shape. Its other labels (tax and government IDs,
//! licences, accounts) are left to the patterns, whose checksums and
//! context words are what keep hashes, ISBNs, ports and dates from being
//! read as identifiers.

use super::patterns::{Hit, glued, phone_shape};
use super::{ADDRESS_LABELS, Entity, NamePiece};

/// Spans at or above this confidence are taken on their own.
const STRONG: f32 = 0.5;
/// Unsure spans are taken when they touch a sure part of the same name or
/// address ("Damian" sure, "Gill" unsure: one name).
const WEAK: f32 = 0.25;
/// At most this many words a street name is extended over backwards
/// ("Cuesta de Pascual Sans" when the model saw "Sans").
const STREET_WORDS_BACK: usize = 4;
/// At most this many capitalised words a name is extended over forwards
/// (surnames the model did not label: "Cipriano Barranco Gallart").
const NAME_WORDS_FORWARD: usize = 3;

/// Words that join the parts of a street's name in the languages the model
/// reads ("Calle de la Paz", "Via della Repubblica", "Rue des Lilas").
const CONNECTORS: &[&str] = &[
    "de", "del", "la", "las", "los", "di", "della", "delle", "dei", "degli", "van", "von", "der",
    "den", "du", "des", "le", "les", "da", "do", "dos", "das", "y", "i", "e", "al", "el",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Person,
    Address,
    Phone,
}

impl Class {
    fn of(label: &str) -> Option<Class> {
        match label {
            "GIVEN_NAME" | "SURNAME" => Some(Class::Person),
            l if ADDRESS_LABELS.contains(&l) => Some(Class::Address),
            "PHONE" => Some(Class::Phone),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Class::Person => "person",
            Class::Address => "address",
            Class::Phone => "phone",
        }
    }
}

#[derive(Debug, Clone)]
struct Part<'a> {
    class: Class,
    label: &'a str,
    start: usize,
    end: usize,
    score: f32,
}

/// Whether the text between two parts keeps them one entity: a few
/// spaces, commas, hyphens or a bracket.
fn joins(text: &str, end: usize, start: usize) -> bool {
    start <= end
        || text.get(end..start).is_some_and(|gap| {
            gap.len() <= 3
                && gap
                    .chars()
                    .all(|c| matches!(c, ' ' | ',' | '-' | '(' | '\n'))
        })
}

/// Whether a comma stands between two parts: it separates people in a
/// list ("Tom, Lisa and Raj", "Jane Doe, John Smith"). An inverted name
/// ("Kowalski, Piotr") then makes two findings too: the model labels its
/// parts as it labels a list's ("Doe" a given name 0.66 in "Doe, Jane"), and
/// each part is still found, redacted and given back whole.
fn comma_between(text: &str, end: usize, start: usize) -> bool {
    text.get(end..start).is_some_and(|gap| gap.contains(','))
}

/// The findings the model's spans make, as hits for overlap resolution.
pub fn hits(text: &str, entities: &[Entity]) -> Vec<Hit> {
    let mut parts: Vec<Part<'_>> = entities
        .iter()
        .filter(|e| e.start < e.end && e.end <= text.len() && e.score >= WEAK)
        .filter(|e| text.is_char_boundary(e.start) && text.is_char_boundary(e.end))
        .filter_map(|e| {
            Some(Part {
                class: Class::of(&e.label)?,
                label: &e.label,
                start: e.start,
                end: e.end,
                score: e.score,
            })
        })
        .collect();
    parts.sort_by_key(|p| (p.start, p.end));

    // Unsure parts stay only next to sure ones of their class (spreading
    // along a chain: sure, unsure, unsure).
    let mut sure: Vec<bool> = parts.iter().map(|p| p.score >= STRONG).collect();
    loop {
        let mut changed = false;
        for i in 0..parts.len() {
            if sure[i] {
                continue;
            }
            let touches = |j: usize| {
                sure[j]
                    && parts[j].class == parts[i].class
                    && (joins(text, parts[j].end, parts[i].start)
                        || joins(text, parts[i].end, parts[j].start))
            };
            let near = (i > 0 && touches(i - 1)) || (i + 1 < parts.len() && touches(i + 1));
            if near {
                sure[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let parts: Vec<Part<'_>> = parts
        .into_iter()
        .zip(sure)
        .filter_map(|(p, s)| s.then_some(p))
        .collect();

    // Neighbouring parts of one class make one group.
    let mut groups: Vec<Vec<Part<'_>>> = Vec::new();
    for p in parts {
        match groups.last_mut() {
            Some(g)
                if g.last().is_some_and(|l| {
                    l.class == p.class
                        && ((joins(text, l.end, p.start)
                            && !(p.class == Class::Person && comma_between(text, l.end, p.start)))
                            || (p.class == Class::Address && joins_address(text, l.end, p.start)))
                }) =>
            {
                g.push(p)
            }
            _ => groups.push(vec![p]),
        }
    }

    let mut out = Vec::new();
    for g in groups {
        let (Some(first), Some(last)) = (g.first(), g.last()) else {
            continue;
        };
        let class = first.class;
        let mut start = first.start;
        let mut end = g.iter().map(|p| p.end).max().unwrap_or(last.end);
        match class {
            Class::Person => {
                // The halves of a double-barrelled name may be labelled
                // apart ("Soria" a surname, "-Escudero" a town); the name
                // is both, and only then is it glued to anything.
                (start, end) = (barrel_back(text, start), barrel_forward(text, end));
                // A span may stop inside a degree ("Seifert B" of "B.A.").
                end = over_degree(text, start, end);
                // Inside an identifier ("l" of `np.linalg`) it is not a name.
                let inside_word = text[..start]
                    .chars()
                    .next_back()
                    .is_some_and(char::is_alphanumeric);
                if inside_word || glued(text, start, end) {
                    continue;
                }
                // A span may stop inside a word ("Dev" of "Devaux", its
                // last piece labelled otherwise): the whole word is the name's.
                let word_end = text[end..]
                    .char_indices()
                    .find(|(_, c)| !(c.is_alphabetic() || *c == '\'' || *c == '-'))
                    .map_or(text.len(), |(i, _)| end + i);
                end = with_degree(text, extend_name(text, word_end, NAME_WORDS_FORWARD, true));
                start = with_titles(text, with_given(text, start));
            }
            Class::Phone => {
                (start, end) = extend_phone(text, start, end);
                if !is_phone(text, start, end) {
                    continue;
                }
            }
            Class::Address => {
                // A span may start or stop inside a word ("cio Angelo" of
                // "Incrocio Angelo"): the whole word is the address's.
                (start, end) = (word_start(text, start), word_end(text, end));
                if !is_address(text, &g) || glued(text, start, end) {
                    continue;
                }
                // A postcode is followed by its town ("54-964 Częstochowa")
                // even when the model did not label it, and a town by its
                // state and postcode ("Lopezland, IN 80162").
                end = address_tail(text, end);
                if matches!(first.label, "STREET_NAME" | "BUILDING_NUMBER") {
                    start = extend_street(text, start, first.label == "BUILDING_NUMBER");
                }
            }
        }
        out.push(Hit {
            class: class.name().to_owned(),
            start,
            end,
            priority: 1,
        });
    }
    out
}

/// An address is more than a lone number or a lone place: a street with
/// a number, or two parts of which one is a word ("10115 Berlin"). A port
/// read as a building number, or a city in a weather question, is not an
/// address.
fn is_address(text: &str, group: &[Part<'_>]) -> bool {
    let has_letters = |p: &Part<'_>| {
        text.get(p.start..p.end)
            .is_some_and(|s| s.chars().any(char::is_alphabetic))
    };
    let has_digits = |p: &Part<'_>| {
        text.get(p.start..p.end)
            .is_some_and(|s| s.chars().any(|c| c.is_ascii_digit()))
    };
    match group {
        [one] => one.label == "STREET_NAME" && has_letters(one) && has_digits(one),
        parts => {
            let distinct = parts
                .iter()
                .any(|p| (p.start, p.end) != (parts[0].start, parts[0].end));
            distinct && parts.iter().any(has_letters) && parts.iter().any(has_digits)
        }
    }
}

/// The model often leaves a country code ("+44" before "(0)29 2018775")
/// or the last groups and an extension outside its span: take them in.
fn extend_phone(text: &str, start: usize, end: usize) -> (usize, usize) {
    const REACH: usize = 12;
    let head = text[..start]
        .char_indices()
        .rev()
        .take(REACH)
        .take_while(|(_, c)| c.is_ascii_digit() || matches!(c, '+' | '(' | ')' | ' ' | '-'))
        .last()
        .map_or(start, |(i, _)| i);
    // Only when what is taken in starts a number (a "+", a digit, a
    // bracket): not a sentence's spaces.
    let head = text[head..start]
        .char_indices()
        .find(|(_, c)| *c != ' ')
        .map_or(start, |(i, _)| head + i);
    let tail_len: usize = text[end..]
        .char_indices()
        .take(REACH)
        .take_while(|(_, c)| c.is_ascii_digit() || matches!(c, '-' | 'x' | ' '))
        .last()
        .map_or(0, |(i, c)| i + c.len_utf8());
    let tail = text[end..end + tail_len].trim_end_matches([' ', '-', 'x']);
    // A trailing word that merely starts with x is not an extension.
    let tail = if tail.ends_with(|c: char| c.is_ascii_digit()) {
        tail.len()
    } else {
        0
    };
    (head, end + tail)
}

/// A phone number the model saw: sure of it, written only with what phone
/// numbers are written with, and shaped like one (not a date, not part of
/// a longer token or run of digit groups).
fn is_phone(text: &str, start: usize, end: usize) -> bool {
    let Some(span) = text.get(start..end) else {
        return false;
    };
    let charset = span
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '(' | ')' | '+' | '-' | '.' | '/' | 'x'))
        || span.contains("ext");
    charset && phone_shape(text, start, end).is_some()
}

/// Extends a street's start backwards over the capitalised words and
/// connectors of its name; from a building number (`number`), also over
/// the comma that Italian and Spanish write between the street and its
/// number ("Incrocio Nicola, 54").
fn extend_street(text: &str, start: usize, number: bool) -> usize {
    let mut best = start;
    let mut at = start;
    for step in 0..STREET_WORDS_BACK {
        let before = &text[..at];
        let Some(trimmed) = before.strip_suffix(' ').map(|b| match b.strip_suffix(',') {
            Some(b) if number && step == 0 => b,
            _ => b,
        }) else {
            break;
        };
        if trimmed.ends_with(',') {
            break;
        }
        let word_start = run_back(trimmed, trimmed.len(), |c| {
            c.is_alphabetic() || c == '.' || c == '\''
        });
        let word = &trimmed[word_start..];
        if word.is_empty() {
            break;
        }
        let capital = word.chars().next().is_some_and(char::is_uppercase);
        let connector = CONNECTORS.contains(&word.to_lowercase().as_str());
        if !capital && !connector {
            break;
        }
        at = word_start;
        // A name starts with a capital, never with a connector.
        if capital {
            best = at;
        }
    }
    best
}

/// Moves a name's end over the capitalised parts joined to it by hyphens
/// ("Soria" + "-Escudero"). Lower-case parts ("alex-prod") are not a
/// name's, and stay glued.
fn barrel_forward(text: &str, end: usize) -> usize {
    let mut end = end;
    while let Some(rest) = text[end..].strip_prefix('-')
        && rest.starts_with(char::is_uppercase)
    {
        let len: usize = rest
            .char_indices()
            .take_while(|(_, c)| c.is_alphabetic() || *c == '\'')
            .last()
            .map_or(0, |(i, c)| i + c.len_utf8());
        end += 1 + len;
    }
    end
}

/// Moves a capitalised name's start back over the capitalised parts joined
/// to it by hyphens ("Chinnici-" before "Bonanno").
fn barrel_back(text: &str, start: usize) -> usize {
    let mut start = start;
    while text[start..].starts_with(char::is_uppercase)
        && let Some(before) = text[..start].strip_suffix('-')
    {
        let at = run_back(before, before.len(), |c| c.is_alphabetic() || c == '\'');
        if at == before.len() || !before[at..].starts_with(char::is_uppercase) {
            break;
        }
        start = at;
    }
    start
}

/// Moves a name's start back over the capitalised word (or two) right
/// before it, inside a sentence (a lower-case word, or one of a script
/// without case, before them): the model
/// may be sure of a surname and read the given name before it as a town or
/// as nothing ("à Frédéric Le Roux", "do Maks Sacharczuk", "to Alex Cox"),
/// and a name redacted without its given name still names the person.
fn with_given(text: &str, start: usize) -> usize {
    let word_back = |end: usize| -> Option<(usize, &str)> {
        let before = text[..end].strip_suffix(' ')?;
        let at = run_back(before, before.len(), |c| {
            c.is_alphabetic() || c == '-' || c == '\''
        });
        (at < before.len()).then(|| (at, &before[at..]))
    };
    // Up to two given names ("con Maite Reina Arroyo Milla"): the words
    // are taken only when a lower-case word comes before the first.
    let mut at = start;
    for _ in 0..2 {
        match word_back(at) {
            Some((given_at, given)) if capitalised(given) => {
                at = given_at;
                // Lower case, or a script without case (`明日 Maria Garcia
                // さん`): not another capitalised word.
                if word_back(at).is_some_and(|(_, w)| {
                    w.chars()
                        .next()
                        .is_some_and(|c| c.is_alphabetic() && !c.is_uppercase())
                }) {
                    return at;
                }
            }
            _ => break,
        }
    }
    start
}

/// Whether the text between two parts of an address keeps them one: as
/// [`joins`], or a short gap with a full stop ("Apt. 95"), an unlabelled
/// house or flat number ("Appartamento 2, 75013") or a state's code
/// ("Lopezland, IN 80162").
fn joins_address(text: &str, end: usize, start: usize) -> bool {
    let Some(gap) = text.get(end..start) else {
        return false;
    };
    let separator = |c: char| matches!(c, ' ' | ',' | '.' | '-' | '(' | ')' | '\n');
    let inner = gap.trim_matches(separator);
    gap.len() <= 8
        && !gap.is_empty()
        && inner.chars().all(|c| !separator(c))
        && (inner.is_empty()
            || inner.len() <= 5 && inner.chars().all(|c| c.is_ascii_digit())
            || (2..=3).contains(&inner.len()) && inner.chars().all(|c| c.is_ascii_uppercase()))
}

/// The start of the word `at` is in.
fn word_start(text: &str, at: usize) -> usize {
    run_back(text, at, char::is_alphabetic)
}

/// Where the run of characters that `keep` accepts and that ends at `end`
/// starts (`end` itself when the character before it is not one).
fn run_back(text: &str, end: usize, keep: impl Fn(char) -> bool) -> usize {
    text[..end]
        .char_indices()
        .rev()
        .take_while(|&(_, c)| keep(c))
        .last()
        .map_or(end, |(i, _)| i)
}

/// The end of the word `at` is in (hyphens and apostrophes inside it).
fn word_end(text: &str, at: usize) -> usize {
    if !text[..at].ends_with(char::is_alphabetic) {
        return at;
    }
    text[at..]
        .char_indices()
        .find(|(_, c)| !(c.is_alphabetic() || *c == '-' || *c == '\''))
        .map_or(text.len(), |(i, _)| at + i)
}

/// Moves an address's end over what follows a town or a postcode without
/// a label: the town's name ("25044, Capo Di Ponte"), a province or state
/// code ("(BS)", "IN"), a postcode ("IN 80162"), each after a space or a
/// comma, up to four of them; and a unit's number after its word ("Apt.
/// 67"), wherever the span stops at one.
fn address_tail(text: &str, end: usize) -> usize {
    let mut end = end;
    for _ in 0..4 {
        end = unit_number(text, end);
        let rest = &text[end..];
        let body = rest.trim_start_matches([' ', ',']);
        let gap = rest.len() - body.len();
        if gap == 0 || gap > 3 {
            break;
        }
        let token: usize = body
            .char_indices()
            .take_while(|(_, c)| c.is_alphanumeric() || matches!(c, '-' | '\'' | '(' | ')'))
            .last()
            .map_or(0, |(i, c)| i + c.len_utf8());
        let word = &body[..token];
        let postcode = (3..=10).contains(&word.len())
            && word.chars().filter(char::is_ascii_digit).count() >= 3
            && word.chars().all(|c| c.is_ascii_digit() || c == '-');
        let code =
            |w: &str| (2..=3).contains(&w.len()) && w.chars().all(|c| c.is_ascii_uppercase());
        let province = word
            .strip_prefix('(')
            .and_then(|w| w.strip_suffix(')'))
            .is_some_and(code);
        let town = capitalised(word);
        if !(postcode || code(word) || province || town) {
            break;
        }
        end += gap + token;
        // The rest of a town's name: capitalised words after one space.
        if town {
            end = extend_name(text, end, 2, false);
        }
    }
    end
}

/// Words that name a flat or a unit, after which an address goes on with
/// its number.
const UNITS: &[&str] = &[
    "apt",
    "apartment",
    "suite",
    "ste",
    "unit",
    "flat",
    "piso",
    "appartamento",
    "wohnung",
    "appartement",
    "app",
    "mieszkanie",
    "lok",
    "m",
];

/// Moves an address's end over the number of a unit it stops at ("Apt" of
/// "Apt. 67", "Suite 4B"): the model may label the word and not the
/// number, which then keeps the rest of the address (town, postcode) from
/// joining.
fn unit_number(text: &str, end: usize) -> usize {
    // The span may have taken the abbreviation's full stop.
    let word_end = if text[..end].ends_with('.') {
        end - 1
    } else {
        end
    };
    let word = &text[word_start(text, word_end)..word_end];
    if !UNITS.contains(&word.to_lowercase().as_str()) {
        return end;
    }
    let rest = &text[word_end..];
    let body = rest.strip_prefix('.').unwrap_or(rest);
    let body = body.trim_start_matches(' ');
    let body = body.strip_prefix('#').unwrap_or(body);
    let skipped = rest.len() - body.len();
    let digits = body.chars().take_while(char::is_ascii_digit).count();
    if digits == 0 || digits > 5 || skipped > 3 {
        return end;
    }
    let mut n = digits;
    if body[n..].starts_with(|c: char| c.is_ascii_alphabetic())
        && !body[n + 1..].starts_with(char::is_alphanumeric)
    {
        n += 1;
    }
    if body[n..].starts_with(char::is_alphanumeric) {
        return end;
    }
    word_end + skipped + n
}

/// Degrees and suffixes written after a name ("Christin Schmidtke B.Sc.").
const DEGREES: &[&str] = &[
    "B.Sc.", "M.Sc.", "B.A.", "M.A.", "B.Eng.", "M.Eng.", "LL.M.", "MBA", "MBA.", "Ph.D.", "PhD",
    "MD", "M.D.", "Jr.", "Sr.", "II", "III",
];

/// Titles and forms of address written before a name; the name's span
/// takes them ("Ing. Rene Franke", "Univ.Prof. Dr. Lili Thanel"). Wider
/// than the list of the `titled` pattern (patterns.rs), and rightly: that
/// one makes a name by itself out of the capitalised words after a title,
/// so it leaves out titles that are also initials or words of their own
/// ("D.", "Sri", "Mag."); here a title only extends a name found otherwise.
const TITLES: &[&str] = &[
    "Mr.",
    "Mr",
    "Mrs.",
    "Mrs",
    "Ms.",
    "Ms",
    "Miss",
    "Dr.",
    "Dr",
    "Prof.",
    "Prof",
    "Univ.Prof.",
    "Dipl.-Ing.",
    "Dr.-Ing.",
    "Ing.",
    "Mag.",
    "Herr",
    "Herrn",
    "Frau",
    "M.",
    "Mme",
    "Mlle",
    "Sr.",
    "Sra.",
    "Srta.",
    "D.",
    "Dña.",
    "Dott.",
    "Dott.ssa",
    "Sig.",
    "Sig.ra",
    "Pan",
    "Pani",
    "Shri",
    "Smt.",
    "Sri",
];

/// Moves a name's start back over up to two titles right before it.
fn with_titles(text: &str, start: usize) -> usize {
    let mut start = start;
    for _ in 0..2 {
        let before = &text[..start];
        let trimmed = before.trim_end_matches(' ');
        let gap = before.len() - trimmed.len();
        if gap == 0 || gap > 2 {
            break;
        }
        let Some(title) = TITLES.iter().filter(|t| trimmed.ends_with(*t)).find(|t| {
            // The whole word: not the end of a longer one.
            !trimmed[..trimmed.len() - t.len()]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '.' || c == '-')
        }) else {
            break;
        };
        start = trimmed.len() - title.len();
    }
    start
}

/// A name found by a second reading ([`rereads`]) with what belongs to it
/// around the run: titles before it, a degree after it ("Inken Kaul MBA.",
/// "Detlev Fliegner B.Eng." — the run stops at "MBA" or inside "B.Eng.").
pub fn reread_name(text: &str, start: usize, end: usize) -> (usize, usize) {
    let end = with_degree(text, over_degree(text, start, end));
    (with_titles(text, start), end)
}

/// Moves a name's end to the end of the degree its last word starts
/// ("Jacob Seifert B" of "Jacob Seifert B.A."), so the degree's dots do
/// not read as an identifier's.
fn over_degree(text: &str, start: usize, end: usize) -> usize {
    let word = text[start..end].rfind(' ').map_or(start, |i| start + i + 1);
    DEGREES
        .iter()
        .filter(|d| text[word..].starts_with(*d) && word + d.len() >= end)
        .filter(|d| !text[word + d.len()..].starts_with(char::is_alphanumeric))
        .map(|d| word + d.len())
        .max()
        .unwrap_or(end)
}

/// Extends a name's end over a degree or suffix that follows it.
fn with_degree(text: &str, end: usize) -> usize {
    let rest = &text[end..];
    let rest_trim = rest.trim_start_matches([' ', ',']);
    let gap = rest.len() - rest_trim.len();
    if gap > 2 {
        return end;
    }
    DEGREES
        .iter()
        .filter(|d| rest_trim.starts_with(*d))
        .filter(|d| {
            // The whole word: not the start of a longer one.
            !rest_trim[d.len()..].starts_with(char::is_alphanumeric)
        })
        .map(|d| end + gap + d.len())
        .max()
        .unwrap_or(end)
}

/// Extends a name's end over up to `words` following capitalised words (a
/// surname the model was unsure of, a town after its postcode); with
/// `particles`, also over name particles that a capitalised word follows
/// ("Lucas Devaux Le De Oliveira", "Juan de la Cruz").
fn extend_name(text: &str, end: usize, words: usize, particles: bool) -> usize {
    let mut end = end;
    let mut at = end;
    let mut taken = 0;
    while taken < words {
        let Some(rest) = text[at..].strip_prefix(' ') else {
            break;
        };
        let len: usize = rest
            .char_indices()
            .take_while(|(_, c)| c.is_alphabetic() || *c == '-' || *c == '\'')
            .last()
            .map_or(0, |(i, c)| i + c.len_utf8());
        let word = &rest[..len];
        if capitalised(word) {
            at += 1 + len;
            end = at;
            taken += 1;
        } else if particles && NAME_PARTICLES.contains(&word) {
            at += 1 + len;
        } else {
            break;
        }
    }
    end
}

/// The end of the name `start..end` without a possessive ending
/// ("Kevin's", "Jones'"): "Kevin" and "Kevin's" are one person, who gets
/// one placeholder, and the ending stays in the text for the reader.
pub fn without_possessive(text: &str, start: usize, end: usize) -> usize {
    let Some(span) = text.get(start..end) else {
        return end;
    };
    ["'s", "\u{2019}s", "'S", "\u{2019}S", "'", "\u{2019}"]
        .iter()
        .find_map(|ending| {
            span.strip_suffix(ending)
                // "O'" of "O'Brien" cut short is no name with an ending.
                .filter(|stem| stem.chars().count() > 1 && stem.ends_with(char::is_alphabetic))
                .map(|stem| start + stem.len())
        })
        .unwrap_or(end)
}

/// The end of the name `start..end` without the words written in lower
/// case at its end, where its first word is capitalised: the model reads
/// text without case, and takes the verb after a name for a surname ("my
/// husband Raj collapsed" gives "collapsed" 1.00), which a placeholder
/// would then hide from the cloud. A writer who capitalises the name
/// capitalises its surname too; names written all in lower case keep their
/// span.
pub fn without_lower_tail(text: &str, start: usize, end: usize) -> usize {
    let Some(span) = text.get(start..end) else {
        return end;
    };
    if !span.starts_with(char::is_uppercase) {
        return end;
    }
    let mut kept = span.trim_end();
    while let Some(space) = kept.rfind(char::is_whitespace) {
        let (head, last) = kept.split_at(space);
        if !last.trim_start().starts_with(char::is_lowercase) {
            break;
        }
        kept = head.trim_end();
    }
    start + kept.len()
}

/// Verbs of [`PERSON_VERBS`] that are given names too ("Ping Wu called"),
/// never cut from the start of a name.
const VERBS_THAT_NAME: &[&str] = &["ping"];

/// Where the name `start..end` starts without a verb of [`PERSON_VERBS`]
/// that opens its sentence: the model takes an imperative for a given name
/// ("Pay Yosef for the tutoring session." gives "Pay Yosef" 0.82, "Meet Mei
/// at the station" "Meet" 0.55), which a placeholder would then hide from
/// the cloud with the name. `end` where the verb is all there is.
pub fn without_opening_verb(text: &str, start: usize, end: usize) -> usize {
    let Some(span) = text.get(start..end) else {
        return start;
    };
    let verb_len = span
        .find(|c: char| !c.is_alphabetic())
        .unwrap_or(span.len());
    let Some((verb, rest)) = span.split_at_checked(verb_len) else {
        return start;
    };
    let verb = verb.to_lowercase();
    if !sentence_start(text, start)
        || !PERSON_VERBS.contains(&verb.as_str())
        || VERBS_THAT_NAME.contains(&verb.as_str())
        || !(rest.is_empty() || rest.starts_with(' '))
    {
        return start;
    }
    end - rest.trim_start().len()
}

/// Whether a word is written as a name is: a capital first letter, a
/// lower-case letter somewhere, and no other capital except at the start of
/// a part after a hyphen or apostrophe ("Dupont-Martin", "O'Brien",
/// "Aix-en-Provence"). camelCase ("JavaScript", "getUserName"), shouting
/// ("NEW", "ÆØ") and lone letters are not.
fn capitalised(word: &str) -> bool {
    let mut chars = word.chars();
    let Some(mut prev) = chars.next().filter(|c| c.is_uppercase()) else {
        return false;
    };
    let mut lower = false;
    for c in chars {
        if c.is_lowercase() {
            lower = true;
        } else if c.is_uppercase() && prev != '-' && prev != '\'' {
            return false;
        }
        prev = c;
    }
    lower
}

/// At most this many spans of one text are read again on their own.
pub const MAX_REREADS: usize = 8;
/// Longest run of words read again (given names, surname, particles).
const REREAD_WORDS: usize = 5;

/// Words that may stand inside a name between its capitalised parts
/// ("Margot de la Langlois", "Ludwig van Beethoven").
const NAME_PARTICLES: &[&str] = &[
    "de", "del", "della", "di", "da", "la", "le", "van", "von", "der", "den", "dos", "das", "du",
    "des", "y",
];

/// Runs of capitalised words the model did not take for a name, inside a
/// sentence after a lower-case word (or after a sentence's first word when
/// a name follows it: "Add", "Dear"), to be read again on their own. At the
/// end of a sentence after a preposition the model reads a town where a
/// name stands ("Envoyez le contrat à Thomas Marin." gives "Thomas Marin"
/// as a city); without the sentence, a name reads as a name and "Rio
/// Grande", "Visual Studio" or "Deutsche Bank" read as nothing of the kind.
pub fn rereads(text: &str, entities: &[Entity]) -> Vec<(usize, usize)> {
    let words = words(text);
    let named = |start: usize, end: usize| named(text, entities, start, end);
    let mut out = Vec::new();
    let mut i = 1;
    while i < words.len() {
        let ((prev_at, prev), (start, first)) = (words[i - 1], words[i]);
        let spaced = text.get(prev_at + prev.len()..start) == Some(" ");
        let after_lower = prev.chars().next().is_some_and(char::is_lowercase);
        // A sentence opening with a word a name follows ("Add", "Dear").
        let opening = sentence_start(text, prev_at) && names_follow(&prev.to_lowercase());
        let keyed = after_name_key(text, start);
        if !((spaced && (after_lower || opening) || keyed) && capitalised(first)) {
            i += 1;
            continue;
        }
        // Extend over capitalised words and particles joined by one space.
        let mut last = i;
        let mut capitals = 1;
        let mut j = i + 1;
        while j < words.len() && j - i < REREAD_WORDS {
            let (at, w) = words[j];
            let (pat, pw) = words[j - 1];
            if text.get(pat + pw.len()..at) != Some(" ") {
                break;
            }
            if capitalised(w) {
                capitals += 1;
                last = j;
            } else if !NAME_PARTICLES.contains(&w) {
                break;
            }
            j += 1;
        }
        let end = words[last].0 + words[last].1.len();
        if capitals >= 2 && !named(start, end) {
            out.push((start, end));
        }
        i = last + 1;
    }
    out
}

/// English verbs whose object is a person ("Tell Bob I will be late.",
/// "Give Sam a call.", "…and text Anna when you land."): a lone capitalised
/// word after one is read again as a name ([`names_after_verbs`]), a run of
/// capitalised words after one opening a sentence is read again
/// ([`rereads`], [`name_frame_after`]), and one opening a sentence is no
/// part of the name after it ([`without_opening_verb`]). Some take things
/// as often ("Keep Okafor in the loop.", "Keep Grafana warm…"; "Book Khan a
/// table", "Make Ama the owner"): the readings of the word alone and as a
/// request tell most of them apart. Verbs whose object is far more often
/// a thing ("get", "update", "follow", "tag", "alert") are not here: on
/// requests written for it, they took more tools for people than they
/// found names.
const PERSON_VERBS: &[&str] = &[
    "add",
    "ask",
    "assign",
    "book",
    "bring",
    "buy",
    "call",
    "cc",
    "congratulate",
    "contact",
    "email",
    "find",
    "forward",
    "give",
    "have",
    "help",
    "inform",
    "introduce",
    "invite",
    "keep",
    "let",
    "loop",
    "make",
    "meet",
    "mention",
    "message",
    "notify",
    "pay",
    "phone",
    "ping",
    "remind",
    "schedule",
    "send",
    "show",
    "take",
    "tell",
    "text",
    "thank",
    "warn",
    "welcome",
    "wish",
];

/// What the rest of a sentence from such a verb is read as: "Please " and
/// the verb in lower case, a request in its own right.
pub const REQUEST_FRAME: &str = "Please ";

/// Longest part of a sentence read again as a request, in bytes after the
/// name.
const REQUEST_TAIL: usize = 160;

/// A lone capitalised word a verb of [`PERSON_VERBS`] takes as its object,
/// not yet taken for a name: where it is, and the request to read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerbObject {
    /// The word: byte offsets into the text.
    pub word: (usize, usize),
    /// The word as it is read: as written, or capitalised where the
    /// sentence is written in lower case ("bob" read as "Bob").
    pub name: String,
    /// The request ([`REQUEST_FRAME`], the verb in lower case, the rest as
    /// written up to the sentence's end, the word as `name`).
    pub request: String,
    /// Where `name` starts in `request`.
    pub at: usize,
    /// For a word written capitalised, [`SHORT_FRAME`] and the word with a
    /// full stop (the word at `SHORT_FRAME.len()`); `None` for a word
    /// written in lower case, or where that is the request itself.
    pub short: Option<String>,
}

/// Where a [`VerbObject`]'s word written capitalised is read a second
/// time when its request does not make it a name: right after "tell", with
/// nothing after it. A second object after the word, or a verb the model
/// reads as a noun, hides a name in the request ("Please email Bob the
/// slides before noon." and "Please text Mei." give nothing; "Please tell
/// Bob." 0.99, "Please tell Mei." 0.90). A word written in lower case is
/// not read so: without the sentence around it, words that are names too
/// read as names ("pay bill online", "call june the best month", "add basil
/// before serving"), which the request keeps from it.
pub const SHORT_FRAME: &str = "Please tell ";

/// Words that never name a person, written in lower case: pronouns,
/// articles, quantifiers and particles after a verb of [`PERSON_VERBS`]
/// ("tell me", "send the…", "give up"), and words the model reads as given
/// names where chat ends with them ("when done", [`never_a_name`]).
const NOT_NAMES: &[&str] = &[
    "a",
    "about",
    "again",
    "all",
    "an",
    "and",
    "any",
    "anybody",
    "anyone",
    "around",
    "away",
    "back",
    "both",
    "but",
    "done",
    "each",
    "every",
    "everybody",
    "everyone",
    "for",
    "from",
    "her",
    "here",
    "him",
    "his",
    "how",
    "i",
    "if",
    "in",
    "into",
    "it",
    "its",
    "me",
    "mine",
    "more",
    "my",
    "no",
    "nobody",
    "not",
    "now",
    "of",
    "off",
    "on",
    "one",
    "or",
    "our",
    "out",
    "over",
    "people",
    "please",
    "some",
    "somebody",
    "someone",
    "that",
    "the",
    "their",
    "them",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "to",
    "up",
    "us",
    "what",
    "when",
    "where",
    "which",
    "who",
    "whom",
    "why",
    "with",
    "you",
    "your",
    "yourself",
];

/// Whether the person finding `start..end` is one word written in lower
/// case that never names anyone ([`NOT_NAMES`]): the model reads some as
/// given names where chat ends a request with them ("let me know when
/// done" gives "done" 0.77, "call me when done" 0.91).
pub fn never_a_name(text: &str, start: usize, end: usize) -> bool {
    text.get(start..end)
        .is_some_and(|w| w.chars().all(char::is_lowercase) && NOT_NAMES.contains(&w))
}

/// Whether the sentence holding the word at `at` opens in lower case: its
/// writer does not capitalise, and a name in it may be written "bob".
fn lower_case_sentence(text: &str, at: usize) -> bool {
    let Some(opening) = sentence_opening(text, at, &['.', '!', '?', '\n']) else {
        return false;
    };
    text.get(opening..)
        .and_then(|s| s.chars().find(|c| c.is_alphabetic()))
        .is_some_and(char::is_lowercase)
}

/// A word written in lower case that may be a name written so: letters
/// only, not one of [`NOT_NAMES`], and capitalised as one.
fn lower_case_name(word: &str) -> Option<String> {
    let mut chars = word.chars();
    let first = chars.next()?;
    if !word.chars().all(char::is_lowercase)
        || word.chars().count() < 2
        || NOT_NAMES.contains(&word)
    {
        return None;
    }
    Some(first.to_uppercase().chain(chars).collect())
}

/// Lone capitalised words right after a verb that takes a person
/// ([`PERSON_VERBS`]) — opening a sentence, or in lower case inside one —
/// which the model did not take for a name; in a sentence written in lower
/// case, lower-case words too ("tell bob…"), read capitalised. The model
/// reads a name there as nothing more often than elsewhere: "Tell Bob I
/// will be late." gives "Bob" 0.39 of a name and "Give Sam a call." "Sam"
/// 0.01, where "Please tell Bob…" gives 0.58. Runs of two or more
/// capitalised words are [`rereads`]' instead.
pub fn names_after_verbs(text: &str, entities: &[Entity]) -> Vec<VerbObject> {
    let words = words(text);
    let mut out = Vec::new();
    for (i, &(verb_at, verb)) in words.iter().enumerate() {
        let Some(&(at, word)) = words.get(i + 1) else {
            break;
        };
        // Most words are no such verb: nothing else is looked at for them.
        let Some(lower) = PERSON_VERBS.iter().find(|v| v.eq_ignore_ascii_case(verb)) else {
            continue;
        };
        let end = at + word.len();
        let lone = !words
            .get(i + 2)
            .is_some_and(|&(next, w)| capitalised(w) && text.get(end..next) == Some(" "));
        // Glued to a digit or a mark it is an identifier ("Auth0").
        let glued = text
            .get(end..)
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        let written = capitalised(word);
        let name = if written {
            Some(word.to_owned())
        } else if lower_case_sentence(text, verb_at) {
            lower_case_name(word)
        } else {
            None
        };
        let Some(name) = name else {
            continue;
        };
        if !((sentence_start(text, verb_at) || verb.starts_with(char::is_lowercase))
            && text.get(verb_at + verb.len()..at) == Some(" ")
            && lone
            && !glued
            && !named(text, entities, at, end))
        {
            continue;
        }
        let Some(after) = text.get(end..) else {
            continue;
        };
        let tail_end = after
            .char_indices()
            .find(|&(i, c)| matches!(c, '.' | '!' | '?' | '\n') || i >= REQUEST_TAIL)
            .map_or(text.len(), |(i, c)| end + i + c.len_utf8());
        let (Some(gap), Some(rest)) = (text.get(verb_at + verb.len()..at), text.get(end..tail_end))
        else {
            continue;
        };
        // The model reads a request better as a sentence: "Please call
        // Bob tomorrow" gives "Bob" 0.15, with a full stop 0.53.
        let rest = rest.trim_end();
        let stop = if rest.ends_with(['.', '!', '?']) {
            ""
        } else {
            "."
        };
        let request = format!("{REQUEST_FRAME}{lower}{gap}{name}{rest}{stop}");
        out.push(VerbObject {
            word: (at, end),
            at: REQUEST_FRAME.len() + lower.len() + gap.len(),
            short: Some(format!("{SHORT_FRAME}{name}.")).filter(|s| written && *s != request),
            name,
            request,
        });
    }
    out
}

/// Whether a word after a verb of [`PERSON_VERBS`], read alone (`alone`,
/// its pieces), is more likely a name than not: the first of the two bars
/// a [`VerbObject`] must pass. Read as a request, tools and products become
/// names too ("Please tell Git…" 0.61, "Please add Helm…" 0.91); alone they
/// mostly do not (Git 0.00, Helm 0.26), where "Bob" is 0.96 and "Mia" 0.97.
pub fn name_when_alone(alone: &[NamePiece]) -> bool {
    let n = alone.len().max(1) as f32;
    alone.iter().map(|p| p.person).sum::<f32>() / n >= STRONG
}

/// Whether the model, reading a request of [`names_after_verbs`]
/// (`in_request`, its labels), is sure the word at `at..at + len` is a
/// name: the second bar.
pub fn sure_name_at(in_request: &[Entity], at: usize, len: usize) -> bool {
    in_request.iter().any(|e| {
        matches!(Class::of(&e.label), Some(Class::Person))
            && e.score >= STRONG
            && e.start < at + len
            && at < e.end
    })
}

/// How many capitalised words before a found name are read as its given
/// names ([`word_before_name`]), as [`with_given`] takes at most two.
pub const GIVEN_BEFORE: usize = 2;

/// Where the capitalised word right before a name found at `start` begins,
/// when that word may be its given name and no rule took it: it follows
/// another capitalised word, so [`with_given`] (which wants a lower-case
/// word before it) left it out. The model may be sure of a surname and
/// read the given name before it as nothing: "Phone Sarah Cohen after
/// lunch." gives "Cohen" only, "Send Sam Porter the photos." "Porter"
/// only, and a placeholder on the surname alone sends the given name to
/// the cloud. Such a word is read again where a name is asked for
/// ([`given_where_asked`]). Words that never name anyone ([`NOT_NAMES`])
/// are not, and neither is a word opening its sentence (a verb of
/// [`PERSON_VERBS`] or any other): where a name is asked for, an
/// imperative before a surname reads as a given name ("Let Porter know",
/// "Get Cohen to sign"), as "Sam" does in "Sam Porter will join the call."
pub fn word_before_name(text: &str, start: usize) -> Option<usize> {
    let before = text.get(..start)?.strip_suffix(' ')?;
    let at = run_back(before, before.len(), |c| {
        c.is_alphabetic() || c == '-' || c == '\''
    });
    let word = before.get(at..)?;
    // The word before it is capitalised too, one space between.
    let prior = before.get(..at)?.strip_suffix(' ')?;
    let prior = prior.get(run_back(prior, prior.len(), char::is_alphabetic)..)?;
    (capitalised(word) && capitalised(prior) && !NOT_NAMES.contains(&word.to_lowercase().as_str()))
        .then_some(at)
}

/// Whether, reading [`NAME_FRAME`] and `span` (a word, then the name
/// found after it; `asked` the pieces of that reading, offsets into it),
/// the model is near-certain the word is part of a name, every piece of it,
/// and reads the name's first word as a surname (its pieces, on average,
/// less than [`WEAK`] a given name's). Where a name is asked for, the word
/// before a given name reads as one whatever it is ("Happy Priya",
/// "Google Fatima Khan", "Book Wei Zhang" 0.72 to 1.00 there), and a given
/// name goes before a surname ("Sam Porter": "Porter" 0.03 a given name's).
pub fn given_where_asked(span: &str, asked: &[NamePiece]) -> bool {
    let shift = NAME_FRAME.len();
    let words = words(span);
    let (Some(&(_, word)), Some(&(next_at, next))) = (words.first(), words.get(1)) else {
        return false;
    };
    let of = |(start, end): (usize, usize), f: fn(&NamePiece) -> f32| -> Vec<f32> {
        asked
            .iter()
            .filter(|p| start + shift <= p.start && p.end <= end + shift && p.start < p.end)
            .map(f)
            .collect()
    };
    let read = of((0, word.len()), |p| p.person);
    let given = of((next_at, next_at + next.len()), |p| p.given);
    !read.is_empty()
        && read.iter().all(|&m| m >= ASKED)
        && !given.is_empty()
        && given.iter().sum::<f32>() / (given.len() as f32) < WEAK
}

/// Whether the model took part of `start..end` for a name. A sure piece
/// inside a word ("ld" of "Eraldo", between two read as a town) makes no
/// name, and does not keep the run from a second reading.
fn named(text: &str, entities: &[Entity], start: usize, end: usize) -> bool {
    entities.iter().any(|e| {
        matches!(Class::of(&e.label), Some(Class::Person))
            && e.score >= STRONG
            && e.start < end
            && start < e.end
            && !text
                .get(..e.start)
                .and_then(|b| b.chars().next_back())
                .is_some_and(char::is_alphanumeric)
    })
}

/// Where the sentence holding byte `at` opens: right after the last of
/// `marks` (ASCII) before it, or at the text's start.
fn sentence_opening(text: &str, at: usize, marks: &[char]) -> Option<usize> {
    Some(text.get(..at)?.rfind(marks).map_or(0, |i| i + 1))
}

/// Whether a word at `at` opens its text or a sentence in it: only spaces
/// and opening quotes stand between it and the sentence's opening.
fn sentence_start(text: &str, at: usize) -> bool {
    sentence_opening(text, at, &['.', '!', '?', ':', '\n'])
        .and_then(|opening| text.get(opening..at))
        .is_some_and(|gap| {
            gap.chars()
                .all(|c| [' ', '"', '\'', '(', '«', '„', '“'].contains(&c))
        })
}

/// The words of `text` (letters, apostrophes and inner hyphens) with their
/// byte offsets.
fn words(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        let inside = c.is_alphabetic() || c == '\'' || c == '-';
        match (inside, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                let w = text[s..i].trim_matches(|c| c == '-' || c == '\'');
                if !w.is_empty() {
                    let lead = text[s..i].len() - text[s..i].trim_start_matches(['-', '\'']).len();
                    out.push((s + lead, w));
                }
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// A given name this sure, read alone, makes a name of the capitalised
/// words joined to it by particles ("Margot de la Langlois", where the model
/// labels only "Margot"); places joined by particles ("Rio de Janeiro",
/// "Castilla y León") do not start with one.
const SURE_GIVEN: f32 = 0.9;

/// Whether a span read on its own (`entities` of `span` alone) is a
/// person's name: a sure given name at its start, with a surname after it,
/// spanning more than one word, or very sure and followed by particles.
pub fn person_alone(span: &str, entities: &[Entity]) -> bool {
    let first_end = span.find(' ').unwrap_or(span.len());
    let particles = span.split(' ').skip(1).any(|w| NAME_PARTICLES.contains(&w));
    entities.iter().any(|g| {
        g.label == "GIVEN_NAME"
            && g.score >= STRONG
            && g.start == 0
            && (g.end > first_end
                || (particles && g.score >= SURE_GIVEN)
                || entities
                    .iter()
                    .any(|s| s.label == "SURNAME" && s.score >= WEAK && s.start >= g.end))
    })
}

/// Where a run of three or more capitalised words (particles between them
/// allowed) ends its second: the given name and first surname of a name
/// with two. Two surnames may be joined by a hyphen instead ("Durante
/// Cossiga-Cipolla", which reads as nothing where "Durante Cossiga" reads as
/// a name): then the pair ends at the hyphen.
pub fn leading_pair(span: &str) -> Option<usize> {
    let capitals: Vec<(usize, &str)> = words(span)
        .into_iter()
        .filter(|(_, w)| capitalised(w))
        .collect();
    match capitals.as_slice() {
        [_, (at, second), _, ..] => Some(at + second.len()),
        [_, (at, second)] => second
            .split_once('-')
            .filter(|(first, rest)| !first.is_empty() && capitalised(rest))
            .map(|(first, _)| at + first.len()),
        _ => None,
    }
}

/// How likely, read alone, each word of a name must be part of one.
const NAME_MASS: f32 = 0.5;

/// Whether a span read on its own is a name by the model's belief summed
/// over the name labels: each capitalised word more likely part of a name
/// than not, the first more likely a given name than not — or, for a name
/// written surname first, every word near-certainly a name's and the last
/// more likely a given name than not. Where names the
/// model knows less well split its belief ("Mennea" alone: surname 0.27,
/// part of a given name 0.26, no label 0.44), the labels alone miss them;
/// places and products keep nearly all of it on other labels ("Reggio
/// Emilia": "Reggio" 0.39; "Monte Rosa": "Rosa" 0.19).
pub fn name_alone(span: &str, pieces: &[NamePiece]) -> bool {
    let words: Vec<(usize, &str)> = words(span)
        .into_iter()
        .filter(|(_, w)| capitalised(w))
        .collect();
    let mean = |start: usize, end: usize, of: fn(&NamePiece) -> f32| {
        let (sum, n) = pieces
            .iter()
            .filter(|p| start <= p.start && p.end <= end && p.start < p.end)
            .fold((0.0, 0usize), |(s, n), p| (s + of(p), n + 1));
        (n > 0).then(|| sum / n as f32)
    };
    let given = |&(start, w): &(usize, &str)| {
        mean(start, start + w.len(), |p| p.given).is_some_and(|m| m >= NAME_MASS)
    };
    let sure = |&(start, w): &(usize, &str)| {
        mean(start, start + w.len(), |p| p.person).is_some_and(|m| m >= ASKED)
    };
    // Written surname first ("Chen Wei": "Chen" 0.99 a surname's, "Wei"
    // 0.98 a name's, most of it a given name's).
    let surname_first = || words.iter().all(sure) && words.last().is_some_and(given);
    words.len() >= 2
        && words.iter().all(|&(start, w)| {
            mean(start, start + w.len(), |p| p.person).is_some_and(|m| m >= NAME_MASS)
        })
        && (words.first().is_some_and(given) || surname_first())
}

/// Whether a model label marks part of an address.
pub fn is_place_label(label: &str) -> bool {
    matches!(Class::of(label), Some(Class::Address))
}

/// Where a name is asked for: a run no reading above took is read once
/// more after this.
pub const NAME_FRAME: &str = "Name: ";
/// How sure of every piece the model must be, reading the run where a name
/// is asked for. Everything written there tends towards a name, so only a
/// near-certain reading counts: "Miłosz Mich" 0.99 and "Forum Ramaswamy"
/// 0.94 there (nothing alone); "Deutsche Bank" 0.58, "Hong Kong" 0.70,
/// "Costa Rica" 0.85 there.
const ASKED: f32 = 0.9;
/// A run the model reads alone as this much a place is not a name, however
/// it reads where a name is asked for ("Bad Homburg", "Victoria Station",
/// "Monte Rosa").
const PLACE_MASS: f32 = 0.2;

/// Words a name follows where it is the one written to, met, thanked or
/// copied ("to", "do", "z", "à", "con"...), in the languages the model
/// reads. Only after one of them is a run read where a name is asked for:
/// German writes every noun with a capital, and "die Unterlagen Montag" or
/// "eine neue Kaffeemaschine Reparatur" read there as names too — as do
/// "an Übersetzung Büro" and "für Prüfung Ergebnisse", so German's own
/// prepositions ("an", "mit", "für") are read in a German frame instead
/// ([`GERMAN_CONTEXT`]); words of place ("in", "w", "at", "on") are not
/// among them. Greetings ("dear", "hi", "drogi") are, and so are the verbs
/// whose object is a person ([`PERSON_VERBS`], kept in that one list): a
/// name follows them at the start of a sentence ("Add Max Misra to the
/// list.", "Dear Błażej Potyrała,"), where no lower-case word comes before
/// it.
const NAME_CONTEXT: &[&str] = &[
    "to", "with", "from", "for", "by", "cc", "and", "or", "à", "avec", "de", "pour", "par", "chez",
    "et", "ou", "a", "con", "para", "por", "y", "o", "da", "di", "per", "e", "do", "z", "ze", "od",
    "dla", "u", "i", "oraz", "thanks", "dear", "hi", "hello", "hey", "cher", "chère", "bonjour",
    "caro", "cara", "ciao", "querido", "querida", "hola", "drogi", "droga", "szanowny", "szanowna",
    "lieber", "liebe", "hallo",
];

/// Whether a name may follow `word` (in lower case): one of
/// [`NAME_CONTEXT`] or of [`PERSON_VERBS`].
fn names_follow(word: &str) -> bool {
    NAME_CONTEXT.contains(&word) || PERSON_VERBS.contains(&word)
}

/// German's words a name follows ("an", "mit", "für"...). German writes
/// every noun with a capital, and after "Name: " pairs of nouns read as
/// names ("an Übersetzung Büro" 1.00, "für Prüfung Ergebnisse" 0.98); after
/// a German frame asking for a person ([`NAME_FRAME_DE`]) they do not
/// (0.06, 0.11), and names still do ("Detlev Fliegner" 0.98).
const GERMAN_CONTEXT: &[&str] = &["an", "mit", "von", "für", "bei", "zu", "und", "oder"];

/// Where a name is asked for in German: the frame for runs after
/// [`GERMAN_CONTEXT`].
pub const NAME_FRAME_DE: &str = "Ansprechpartner: ";

/// The frame to read a run in where a name is asked for, by the word right
/// before `start` (one space between): [`NAME_FRAME`] after one of
/// [`NAME_CONTEXT`], [`NAME_FRAME_DE`] after one of German's; none after
/// any other word.
pub fn name_frame_after(text: &str, start: usize) -> Option<&'static str> {
    let before = text.get(..start)?.strip_suffix(' ')?;
    let word = before[word_start(before, before.len())..].to_lowercase();
    if word.is_empty() {
        None
    } else if names_follow(&word) {
        Some(NAME_FRAME)
    } else if GERMAN_CONTEXT.contains(&word.as_str()) {
        Some(NAME_FRAME_DE)
    } else {
        None
    }
}

/// Whether a run the model reads as nothing, alone, is a name it does not
/// know: its last word is rare (the model's vocabulary holds it only in
/// pieces, as it holds "Ramaswamy" or "Potyrała", where it holds "Hat",
/// "Romeo", "Friday" and "Sachs" whole), read where a name is asked for
/// (`asked`: the pieces of the run after the frame [`name_frame_after`]
/// chose, offsets into `span`) every piece of every capitalised word is
/// near-certainly a name's, and alone (`alone`, the run's word pieces) no
/// word reads more as a place than as a name (Polish names in the genitive
/// read alone as both: "Kowalskiego" 0.30 a street's, 0.47 a name's).
/// Words of tools and services ("Visual Studio", "Google Drive",
/// "Customer Support") stay out even where a name is asked for; name-like
/// brands and places ending in a whole word ("Alfa Romeo", "Monte Carlo",
/// "Red Hat") are read there as names, and the rare last word keeps them
/// out. What remains ("Porta Nuova", "Seat Ibiza", "Milton Keynes") is
/// kept from the cloud as a name would be.
///
/// After a key that asks for a name (`keyed`: `"name": "…"`, `Full name:
/// …`) the text itself says what the run is, and the framed reading alone
/// decides: the rare last word and the place reading are not asked for
/// ("Visitación Montes-Gual" reads alone as a town).
pub fn name_where_asked(span: &str, alone: &[NamePiece], asked: &[NamePiece], keyed: bool) -> bool {
    let words: Vec<(usize, usize)> = words(span)
        .into_iter()
        .filter(|(_, w)| capitalised(w))
        .map(|(at, w)| (at, at + w.len()))
        .collect();
    let inside = |p: &NamePiece, (start, end): (usize, usize)| {
        start <= p.start && p.end <= end && p.start < p.end
    };
    let rare = words
        .last()
        .is_some_and(|&w| alone.iter().filter(|p| inside(p, w)).count() >= 2);
    words.len() >= 2
        && (rare || keyed)
        && words.iter().all(|&w| {
            let read: Vec<f32> = asked
                .iter()
                .filter(|p| inside(p, w))
                .map(|p| p.person)
                .collect();
            let (place, person) = alone
                .iter()
                .filter(|p| inside(p, w))
                .fold((0.0, 0.0), |(pl, pe), p| (pl + p.place, pe + p.person));
            let n = alone.iter().filter(|p| inside(p, w)).count().max(1) as f32;
            // A word the model reads as a place more than as a name.
            let place = place / n >= PLACE_MASS && place >= person;
            !read.is_empty() && read.iter().all(|&m| m >= ASKED) && (keyed || !place)
        })
}

/// What a key names before "name" when it asks for a person's
/// (`customer_name`, `accountHolderName`); `city_name`, `file_name` or
/// `team_name` ask for something else.
#[rustfmt::skip]
const PERSON_KEYS: &[&str] = &[
    "full", "first", "last", "given", "family", "middle", "maiden", "legal", "real", "display",
    "user", "customer", "client", "contact", "patient", "author", "owner", "sender", "recipient",
    "employee", "person", "holder", "guest", "member", "manager", "beneficiary", "applicant",
    "passenger", "student", "driver", "buyer", "seller", "tenant", "billing", "shipping",
    "spouse", "parent", "doctor", "candidate", "assignee", "reviewer", "requester", "reporter",
    "signer", "witness", "agent", "my", "your",
];

/// Whether the text right before `start` is a key asking for a person's
/// name: `name`, or a word ending in it after one of [`PERSON_KEYS`]
/// (`full_name`, `customerName`, `Name`), then `:` or `=`, quotes and
/// spaces around them allowed.
pub fn after_name_key(text: &str, start: usize) -> bool {
    let Some(before) = text.get(..start) else {
        return false;
    };
    let before = before
        .strip_suffix(['"', '\''])
        .unwrap_or(before)
        .trim_end_matches(' ');
    let Some(before) = before.strip_suffix([':', '=']) else {
        return false;
    };
    let before = before.trim_end_matches(' ');
    let before = before.strip_suffix(['"', '\'']).unwrap_or(before);
    let key_start = run_back(before, before.len(), |c| {
        c.is_ascii_alphanumeric() || c == '_'
    });
    let key: String = before[key_start..]
        .chars()
        .filter(|c| *c != '_')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    key.strip_suffix("name")
        .is_some_and(|what| what.is_empty() || PERSON_KEYS.iter().any(|k| what.ends_with(k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(text: &str, label: &str, part: &str, score: f32) -> Entity {
        let start = text.find(part).unwrap_or(0);
        Entity {
            label: label.into(),
            start,
            end: start + part.len(),
            score,
        }
    }

    fn spans(text: &str, ents: &[Entity]) -> Vec<(String, String)> {
        hits(text, ents)
            .into_iter()
            .map(|h| (h.class, text[h.start..h.end].to_owned()))
            .collect()
    }

    #[test]
    fn an_unsure_surname_next_to_a_sure_given_name_is_one_name() {
        let t = "Proszę przekazać umowę do Damian Gill.";
        let got = spans(
            t,
            &[
                e(t, "GIVEN_NAME", "Damian", 0.98),
                e(t, "SURNAME", "Gill", 0.3),
            ],
        );
        assert_eq!(got, vec![("person".into(), "Damian Gill".into())]);
        // Alone, an unsure span is not taken.
        assert!(spans(t, &[e(t, "SURNAME", "Gill", 0.3)]).is_empty());
    }

    #[test]
    fn people_in_a_list_are_apart() {
        // The model's parts as (label, words, score).
        type Parts<'a> = &'a [(&'a str, &'a str, f32)];
        // (text, its parts, the names found)
        let cases: &[(&str, Parts<'_>, &[&str])] = &[
            (
                "The attendees were Tom, Lisa and Raj.",
                &[
                    ("GIVEN_NAME", "Tom", 0.95),
                    ("GIVEN_NAME", "Lisa", 0.95),
                    ("GIVEN_NAME", "Raj", 0.95),
                ],
                &["Tom", "Lisa", "Raj"],
            ),
            (
                "Invite Jane Doe, John Smith to the call.",
                &[
                    ("GIVEN_NAME", "Jane", 0.95),
                    ("SURNAME", "Doe", 0.95),
                    ("GIVEN_NAME", "John", 0.95),
                    ("SURNAME", "Smith", 0.95),
                ],
                &["Jane Doe", "John Smith"],
            ),
            // Written surname first, a name is two findings, each kept
            // from the cloud and each given back.
            (
                "Patient: Garcia Lopez, Maria, seen today.",
                &[
                    ("SURNAME", "Garcia", 0.95),
                    ("SURNAME", "Lopez", 0.95),
                    ("GIVEN_NAME", "Maria", 0.95),
                ],
                &["Garcia Lopez", "Maria"],
            ),
            // An unsure name next to a sure one across a comma is still taken.
            (
                "Ask Tom, Lisa about it.",
                &[("GIVEN_NAME", "Tom", 0.95), ("GIVEN_NAME", "Lisa", 0.3)],
                &["Tom", "Lisa"],
            ),
        ];
        for (t, parts, want) in cases {
            let ents: Vec<Entity> = parts.iter().map(|(l, w, s)| e(t, l, w, *s)).collect();
            let want: Vec<(String, String)> = want
                .iter()
                .map(|n| ("person".to_owned(), (*n).to_owned()))
                .collect();
            assert_eq!(spans(t, &ents), want, "{t}");
        }
    }

    #[test]
    fn an_unlabelled_surname_after_a_given_name_joins_it() {
        let t = "Napisz wiadomość do Maurycy Szyba.";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Maurycy", 0.92)]),
            vec![("person".into(), "Maurycy Szyba".into())]
        );
        let t = "Natalia sold clips to 48 of her friends.";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Natalia", 1.0)]),
            vec![("person".into(), "Natalia".into())]
        );
    }

    #[test]
    fn surnames_with_particles_are_taken_whole() {
        let t = "Écris un message pour Lucas Devaux Le De Oliveira.";
        let got = spans(
            t,
            &[
                e(t, "GIVEN_NAME", "Lucas", 0.99),
                e(t, "SURNAME", "Devaux", 0.65),
            ],
        );
        assert_eq!(
            got,
            vec![("person".into(), "Lucas Devaux Le De Oliveira".into())]
        );
        // The model's span may stop inside a word.
        let t = "Écris un message pour Lucas Devaux Le De Oliveira.";
        let got = spans(
            t,
            &[
                e(t, "GIVEN_NAME", "Lucas", 0.97),
                e(t, "SURNAME", "Dev", 0.48),
            ],
        );
        assert_eq!(
            got,
            vec![("person".into(), "Lucas Devaux Le De Oliveira".into())]
        );
        let t = "Ask Juan de la Cruz about it.";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Juan", 0.95)]),
            vec![("person".into(), "Juan de la Cruz".into())]
        );
        // A particle that no capitalised word follows is not the name's.
        let t = "Ask Juan de la casa.";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Juan", 0.95)]),
            vec![("person".into(), "Juan".into())]
        );
    }

    #[test]
    fn names_inside_identifiers_are_not_names() {
        let t = "print(np.linalg.det(matrix))";
        assert!(spans(t, &[e(t, "GIVEN_NAME", "l", 0.6)]).is_empty());
        let t = "call user_Anna now";
        assert!(spans(t, &[e(t, "GIVEN_NAME", "Anna", 0.9)]).is_empty());
        let t = "O'Neill said hi to Anna.";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Anna", 0.9)]),
            vec![("person".into(), "Anna".into())]
        );
    }

    #[test]
    fn a_degree_after_a_name_belongs_to_it() {
        let t = r#"{"name": "Christin Schmidtke B.Sc.", "note": "urgent"}"#;
        assert_eq!(
            spans(
                t,
                &[
                    e(t, "GIVEN_NAME", "Christin", 0.9),
                    e(t, "SURNAME", "Schmidtke", 0.9)
                ]
            ),
            vec![("person".into(), "Christin Schmidtke B.Sc.".into())]
        );
        let t = "Anna Weber MDR reports";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Anna", 0.9)]),
            vec![("person".into(), "Anna Weber".into())]
        );
    }

    #[test]
    fn titles_before_a_name_belong_to_it() {
        let t = "Bitte leite den Vertrag an Ing. Rene Franke weiter.";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Rene Franke", 0.9)]),
            vec![("person".into(), "Ing. Rene Franke".into())]
        );
        let t = "Schreib an Univ.Prof. Dr. Lili Thanel B.Eng. heute.";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Lili Thanel", 0.9)]),
            vec![("person".into(), "Univ.Prof. Dr. Lili Thanel B.Eng.".into())]
        );
        // Only whole words: "Dr" ending "HDr" or "Prof" of "xProf" is not a title.
        let t = "open HDr Anna Weber";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Anna Weber", 0.9)]),
            vec![("person".into(), "Anna Weber".into())]
        );
        let t = "Mr.  Anna";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Anna", 0.9)]),
            vec![("person".into(), "Mr.  Anna".into())]
        );
        let t = "Mr.   Anna";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Anna", 0.9)]),
            vec![("person".into(), "Anna".into())]
        );
        for t in ["Dr. Ó", "M. é", " Pan Ł"] {
            let at = t.len() - t.chars().next_back().map_or(0, char::len_utf8);
            assert!(with_titles(t, at) <= at);
        }
    }

    #[test]
    fn lone_numbers_and_lone_places_are_not_addresses() {
        let t = "docker run -p 8080:8080 -e WORKERS=4";
        let ents = [
            e(t, "BUILDING_NUMBER", "8080", 0.66),
            e(t, "ZIP_CODE", "8080", 0.9),
        ];
        assert!(spans(t, &ents).is_empty());
        let t = "gate B42 at 09:20";
        assert!(spans(t, &[e(t, "BUILDING_NUMBER", "B42", 0.9)]).is_empty());
        let t = "Is it raining in Sevilla?";
        assert!(spans(t, &[e(t, "CITY", "Sevilla", 0.99)]).is_empty());
    }

    #[test]
    fn a_street_name_is_taken_whole() {
        let t = "Mi nueva dirección es Cuesta de Pascual Sans 514, Lugo, 38701.";
        let got = spans(
            t,
            &[
                e(t, "STREET_NAME", "Sans", 0.58),
                e(t, "BUILDING_NUMBER", "514", 1.0),
                e(t, "CITY", "Lugo", 0.99),
                e(t, "ZIP_CODE", "38701", 1.0),
            ],
        );
        assert_eq!(
            got,
            vec![(
                "address".into(),
                "Cuesta de Pascual Sans 514, Lugo, 38701".into()
            )]
        );
        let t = "Envía el paquete a Pasadizo de Ascensión Artigas 270 Puerta 3";
        let got = spans(
            t,
            &[
                e(t, "BUILDING_NUMBER", "270", 0.97),
                e(t, "STREET_NAME", "Puerta 3", 0.94),
            ],
        );
        assert_eq!(
            got,
            vec![(
                "address".into(),
                "Pasadizo de Ascensión Artigas 270 Puerta 3".into()
            )]
        );
    }

    #[test]
    fn an_address_is_taken_over_its_state_flat_number_and_province() {
        // A US state's code between the town and the postcode.
        let t = "Please update my billing address to 683 Robert Hollow, Lopezland, IN 80162.";
        let got = spans(
            t,
            &[
                e(t, "BUILDING_NUMBER", "683", 1.0),
                e(t, "STREET_NAME", "Robert Hollow", 1.0),
                e(t, "CITY", "Lopezland", 1.0),
                e(t, "ZIP_CODE", "80162", 1.0),
            ],
        );
        assert_eq!(
            got,
            vec![(
                "address".into(),
                "683 Robert Hollow, Lopezland, IN 80162".into()
            )]
        );
        // Italian order: street, comma, number, flat, postcode, town and
        // province, the model's span starting inside the street's type.
        let t = "Spedisci il pacco a Incrocio Angelo, 9 Appartamento 2, 75013, Ferrandina (MT).";
        let got = spans(
            t,
            &[
                e(t, "STREET_NAME", "cio Angelo", 0.7),
                e(t, "BUILDING_NUMBER", "9", 0.95),
                e(t, "STREET_NAME", "Appartamento", 0.73),
                e(t, "ZIP_CODE", "75013", 0.97),
                e(t, "CITY", "Ferrandina", 1.0),
            ],
        );
        assert_eq!(
            got,
            vec![(
                "address".into(),
                "Incrocio Angelo, 9 Appartamento 2, 75013, Ferrandina (MT)".into()
            )]
        );
        // The street before a comma and the number; the town after a
        // postcode, with no label at all.
        let t = r#"{"address": "Incrocio Nicola, 54 Piano 3, 28016, Orta San Giulio (NO)"}"#;
        let got = spans(
            t,
            &[
                e(t, "BUILDING_NUMBER", "54", 0.98),
                e(t, "STREET_NAME", "Piano 3", 0.94),
                e(t, "ZIP_CODE", "28016", 1.0),
            ],
        );
        assert_eq!(
            got,
            vec![(
                "address".into(),
                "Incrocio Nicola, 54 Piano 3, 28016, Orta San Giulio (NO)".into()
            )]
        );
        // A sentence's words before a number and a comma are not a street's.
        let t = "Ma nouvelle adresse est 78, boulevard Caroline Dupuis, 44812 De Sousa-sur-Mer.";
        let got = spans(
            t,
            &[
                e(t, "BUILDING_NUMBER", "78", 1.0),
                e(t, "STREET_NAME", "boulevard Caroline Dupuis", 1.0),
                e(t, "ZIP_CODE", "44812", 1.0),
            ],
        );
        assert_eq!(
            got,
            vec![(
                "address".into(),
                "78, boulevard Caroline Dupuis, 44812 De Sousa-sur-Mer".into()
            )]
        );
        // Words in the gap are not a state's code.
        assert!(!joins_address("Lopezland and the 80162", 9, 18));
        assert!(joins_address("Lopezland, IN 80162", 9, 14));
        assert!(joins_address("Apt. 95", 3, 5));
    }

    #[test]
    fn a_postcode_takes_its_town_and_ids_are_not_addresses() {
        let t = "Wyślij paczkę na adres ul. Wiklinowa 573, 54-964 Częstochowa.";
        let got = spans(
            t,
            &[
                e(t, "STREET_NAME", "ul. Wiklinowa", 0.96),
                e(t, "BUILDING_NUMBER", "573", 1.0),
                e(t, "ZIP_CODE", "54-964", 1.0),
            ],
        );
        assert_eq!(
            got,
            vec![(
                "address".into(),
                "ul. Wiklinowa 573, 54-964 Częstochowa".into()
            )]
        );
        let t = "uuid: 123e4567-e86b-12d3-a066-436614174000";
        let ents = [
            e(t, "STREET_NAME", "e86b", 0.7),
            e(t, "BUILDING_NUMBER", "12d3", 0.8),
        ];
        assert!(spans(t, &ents).is_empty());
    }

    #[test]
    fn other_labels_are_left_to_the_patterns() {
        let t = "commit 4f2a9c1b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a";
        assert!(spans(t, &[e(t, "DRIVERS_LICENSE", "4f2a9c1b8d7e", 0.9)]).is_empty());
        let t = "ISBN 978-3-16-148410-0";
        assert!(spans(t, &[e(t, "TAX_ID", "978-3-16-148410-0", 0.9)]).is_empty());
    }

    #[test]
    fn phone_numbers_the_model_sees_are_taken_when_shaped_like_one() {
        let t = "Rufen Sie mich unter (0161) 496 0034 an.";
        assert_eq!(
            spans(t, &[e(t, "PHONE", "(0161) 496 0034", 0.97)]),
            vec![("phone".into(), "(0161) 496 0034".into())]
        );
        for (t, part) in [
            ("released on 2024-03-15 at noon", "2024-03-15"),
            ("order 4111 1111 1111 1111 shipped", "4111 1111 1111"),
            ("build 12345678-abc finished", "12345678"),
        ] {
            assert!(spans(t, &[e(t, "PHONE", part, 0.97)]).is_empty(), "{t}");
        }
        let t = "Call me at +44(0)29 2018775 after six.";
        assert_eq!(
            spans(t, &[e(t, "PHONE", "(0)29 2018775", 0.94)]),
            vec![("phone".into(), "+44(0)29 2018775".into())]
        );
        let t = "Call me at 001-538-390-5470x492 after six.";
        assert_eq!(
            spans(t, &[e(t, "PHONE", "001-538-390", 0.7)]),
            vec![("phone".into(), "001-538-390-5470x492".into())]
        );
        // Unsure alone: not taken.
        let t = "Rufen Sie mich unter (0161) 496 0034 an.";
        assert!(spans(t, &[e(t, "PHONE", "(0161) 496 0034", 0.3)]).is_empty());
    }

    #[test]
    fn any_offsets_are_safe() {
        let t = "Grüße an Jürgen";
        for s in 0..t.len() + 2 {
            for end in 0..t.len() + 2 {
                let ents = [Entity {
                    label: "GIVEN_NAME".into(),
                    start: s,
                    end,
                    score: 0.9,
                }];
                for h in hits(t, &ents) {
                    assert!(t.get(h.start..h.end).is_some());
                }
            }
        }
    }

    #[test]
    fn capitalised_runs_after_a_lower_case_word_are_read_again() {
        let got = |t: &str, ents: &[Entity]| -> Vec<String> {
            rereads(t, ents)
                .into_iter()
                .map(|(s, e)| t[s..e].to_owned())
                .collect()
        };
        let t = "Envoyez le contrat à Thomas Marin.";
        assert_eq!(
            got(t, &[e(t, "CITY", "Thomas Marin", 0.67)]),
            ["Thomas Marin"]
        );
        let t = "Merci de transmettre le dossier à Margot de la Langlois.";
        assert_eq!(got(t, &[]), ["Margot de la Langlois"]);
        // Not a sentence's first words, one capitalised word, or a name
        // the model already found.
        assert!(got("Thomas Marin called.", &[]).is_empty());
        assert!(got("Send it to Paris.", &[]).is_empty());
        let t = "Send it to Anna Weber.";
        assert!(got(t, &[e(t, "GIVEN_NAME", "Anna", 0.9)]).is_empty());
        // Code and shouting are not names.
        assert!(got("call getUserName or HTTP_PROXY now", &[]).is_empty());
        assert!(got("it runs on NEW YORK time", &[]).is_empty());
        // After punctuation a clause starts: not read again.
        assert!(got("as they said: Good Morning", &[]).is_empty());
    }

    #[test]
    fn a_name_alone_is_a_sure_given_name_then_a_surname() {
        let t = "Thomas Marin";
        assert!(person_alone(
            t,
            &[
                e(t, "GIVEN_NAME", "Thomas", 0.97),
                e(t, "SURNAME", "Marin", 0.72)
            ]
        ));
        let t = "Massimo Leone";
        assert!(person_alone(
            t,
            &[e(t, "GIVEN_NAME", "Massimo Leone", 0.75)]
        ));
        let t = "Margot de la Langlois";
        assert!(person_alone(t, &[e(t, "GIVEN_NAME", "Margot", 0.98)]));
        let t = "Castilla y León";
        assert!(!person_alone(
            t,
            &[
                e(t, "GIVEN_NAME", "Castilla", 0.62),
                e(t, "GIVEN_NAME", "León", 0.99)
            ]
        ));
        let t = "Victoria Station";
        assert!(!person_alone(t, &[e(t, "GIVEN_NAME", "Victoria", 0.95)]));
        let t = "Rio Grande";
        assert!(!person_alone(t, &[e(t, "CITY", "Rio Grande", 0.61)]));
        let t = "Reggio Emilia";
        assert!(!person_alone(t, &[e(t, "GIVEN_NAME", "Emilia", 0.9)]));
        assert!(!person_alone("Hello World", &[]));
    }

    #[test]
    fn capitalised_words_are_written_as_names() {
        for w in [
            "Anna",
            "Łukasz",
            "Dupont-Martin",
            "O'Brien",
            "Aix-en-Provence",
            "Øs",
        ] {
            assert!(capitalised(w), "{w}");
        }
        for w in [
            "anna",
            "JavaScript",
            "McDonald",
            "NEW",
            "ÆØ",
            "Ł",
            "A-",
            "A'",
            "",
            "-Ab",
        ] {
            assert!(!capitalised(w), "{w}");
        }
    }

    #[test]
    fn hyphenated_surnames_and_towns_are_taken_whole() {
        let t = "Écris à Marie Dupont-Martin demain.";
        assert_eq!(
            spans(t, &[e(t, "GIVEN_NAME", "Marie", 0.97)]),
            vec![("person".into(), "Marie Dupont-Martin".into())]
        );
        let t = "Envoyez le contrat à Marie Dupont-Martin.";
        assert_eq!(
            rereads(t, &[])
                .into_iter()
                .map(|(s, e)| &t[s..e])
                .collect::<Vec<_>>(),
            ["Marie Dupont-Martin"]
        );
        let t = "Adresse : 12 rue des Lices, 13100 Aix-en-Provence.";
        let got = spans(
            t,
            &[
                e(t, "BUILDING_NUMBER", "12", 1.0),
                e(t, "STREET_NAME", "rue des Lices", 0.95),
                e(t, "ZIP_CODE", "13100", 1.0),
            ],
        );
        assert_eq!(
            got,
            vec![(
                "address".into(),
                "12 rue des Lices, 13100 Aix-en-Provence".into()
            )]
        );
    }

    #[test]
    fn a_double_barrelled_name_labelled_in_halves_is_one_name() {
        let t = "Ayer hablé con Alcides Soria-Escudero sobre la factura.";
        let got = spans(
            t,
            &[
                e(t, "GIVEN_NAME", "Alcides", 0.93),
                e(t, "SURNAME", "Soria", 0.8),
                e(t, "CITY", "Escudero", 0.2),
            ],
        );
        assert_eq!(
            got,
            vec![("person".into(), "Alcides Soria-Escudero".into())]
        );
        let t = "Per favore inoltra il contratto a Simonetta Chinnici-Bonanno.";
        assert_eq!(
            spans(t, &[e(t, "SURNAME", "Bonanno", 0.9)]),
            vec![("person".into(), "Simonetta Chinnici-Bonanno".into())]
        );
        // Lower-case parts are an identifier's: glued, not a name.
        let t = "Restart Alex-prod now.";
        assert!(spans(t, &[e(t, "GIVEN_NAME", "Alex", 0.9)]).is_empty());
        let t = "Restart the web-Alex pod.";
        assert!(spans(t, &[e(t, "GIVEN_NAME", "Alex", 0.9)]).is_empty());
    }

    #[test]
    fn the_capitalised_word_before_a_name_inside_a_sentence_is_part_of_it() {
        let t = "Please forward the contract to Alex Cox before Friday.";
        assert_eq!(
            spans(t, &[e(t, "SURNAME", "Cox", 0.84)]),
            vec![("person".into(), "Alex Cox".into())]
        );
        let t = "Merci de transmettre le dossier à Frédéric Le Roux.";
        assert_eq!(
            spans(t, &[e(t, "SURNAME", "Le Roux", 0.6)]),
            vec![("person".into(), "Frédéric Le Roux".into())]
        );
        // Two given names.
        let t = "Ayer hablé con Maite Reina Arroyo Milla sobre la factura.";
        assert_eq!(
            spans(t, &[e(t, "SURNAME", "Arroyo Milla", 0.83)]),
            vec![("person".into(), "Maite Reina Arroyo Milla".into())]
        );
        // Three capitalised words before it: not all given names.
        let t = "We met at Central Park West Cox.";
        assert_eq!(
            spans(t, &[e(t, "SURNAME", "Cox", 0.9)]),
            vec![("person".into(), "Cox".into())]
        );
        // A sentence's first word may be anything; a lower-case word is not
        // a given name; a title stays a title.
        let t = "Yesterday Cox called.";
        assert_eq!(
            spans(t, &[e(t, "SURNAME", "Cox", 0.9)]),
            vec![("person".into(), "Cox".into())]
        );
        let t = "I met with Cox.";
        assert_eq!(
            spans(t, &[e(t, "SURNAME", "Cox", 0.9)]),
            vec![("person".into(), "Cox".into())]
        );
        let t = "Write to Dr. Cox.";
        assert_eq!(
            spans(t, &[e(t, "SURNAME", "Cox", 0.9)]),
            vec![("person".into(), "Dr. Cox".into())]
        );
    }

    #[test]
    fn a_sentence_opening_with_a_word_a_name_follows_is_read_again() {
        let got = |t: &str| -> Vec<String> {
            rereads(t, &[])
                .into_iter()
                .map(|(s, e)| t[s..e].to_owned())
                .collect()
        };
        assert_eq!(got("Add Max Misra to the guest list."), ["Max Misra"]);
        assert_eq!(got("Dear Błażej Potyrała, thanks."), ["Błażej Potyrała"]);
        assert_eq!(got("Done. Call Anna Weber tomorrow."), ["Anna Weber"]);
        assert_eq!(name_frame_after("Add Max Misra", 4), Some(NAME_FRAME));
        // Other opening words, and words a name follows inside a clause
        // after a capital, are not openings.
        assert!(got("Visit New York City.").is_empty());
        assert!(got("The Call Center Support team").is_empty());
    }

    #[test]
    fn a_name_alone_may_split_the_models_belief_between_labels() {
        let piece =
            |t: &str, w: &str, person: f32, given: f32| name_piece(t, w, person, given, 0.0);
        let t = "Pasqual Mennea";
        assert!(name_alone(
            t,
            &[
                piece(t, "Pas", 0.57, 0.56),
                piece(t, "qual", 0.58, 0.56),
                piece(t, "Men", 0.54, 0.27),
                piece(t, "nea", 0.54, 0.28),
            ]
        ));
        // Particles are not weighed; every capitalised word is.
        let t = "Juan de la Cruz";
        assert!(name_alone(
            t,
            &[piece(t, "Juan", 0.9, 0.9), piece(t, "Cruz", 0.7, 0.1)]
        ));
        let t = "Reggio Emilia";
        assert!(!name_alone(
            t,
            &[
                piece(t, "Reggio", 0.39, 0.33),
                piece(t, "Emilia", 0.76, 0.73)
            ]
        ));
        // The first word must read as a given name, or, where every word
        // is near-certainly a name's, the last (written surname first).
        let t = "Weber Anna";
        assert!(!name_alone(
            t,
            &[piece(t, "Weber", 0.85, 0.1), piece(t, "Anna", 0.9, 0.9)]
        ));
        let t = "Chen Wei";
        assert!(name_alone(
            t,
            &[piece(t, "Chen", 0.99, 0.01), piece(t, "Wei", 0.98, 0.8)]
        ));
        assert!(!name_alone(
            t,
            &[piece(t, "Chen", 0.99, 0.01), piece(t, "Wei", 0.98, 0.3)]
        ));
        // A word the model said nothing of is not a name's.
        let t = "Anna Weber";
        assert!(!name_alone(t, &[piece(t, "Anna", 0.9, 0.9)]));
        assert!(!name_alone("Anna", &[piece("Anna", "Anna", 0.9, 0.9)]));
        assert!(!name_alone("", &[]));
    }

    #[test]
    fn a_name_the_model_does_not_know_reads_as_one_where_a_name_is_asked_for() {
        let piece =
            |t: &str, w: &str, person: f32, place: f32| name_piece(t, w, person, person, place);
        let t = "Miłosz Mich";
        let alone = [
            piece(t, "Mił", 0.0, 0.0),
            piece(t, "osz", 0.0, 0.0),
            piece(t, "Mic", 0.0, 0.0),
            piece(t, "h", 0.0, 0.0),
        ];
        let asked = [
            piece(t, "Mił", 0.99, 0.0),
            piece(t, "osz", 0.98, 0.0),
            piece(t, "Mich", 0.97, 0.0),
        ];
        assert!(name_where_asked(t, &alone, &asked, false));
        // Every piece near-certain: one doubtful piece is enough to refuse.
        let unsure = [
            piece(t, "Mił", 0.99, 0.0),
            piece(t, "osz", 0.6, 0.0),
            piece(t, "Mich", 0.97, 0.0),
        ];
        assert!(!name_where_asked(t, &alone, &unsure, false));
        // A word not read at all where asked is not a name's.
        assert!(!name_where_asked(t, &alone, &asked[..2], false));
        // A last word the vocabulary holds whole is too common to be taken
        // on this reading alone ("Red Hat", "Alfa Romeo").
        let whole = [piece(t, "Mił", 0.0, 0.0), piece(t, "Mich", 0.0, 0.0)];
        assert!(!name_where_asked(t, &whole, &asked, false));
        // Read as a place alone: not a name, however it reads where asked.
        let t = "Bad Homburg";
        let alone = [
            piece(t, "Bad", 0.0, 0.9),
            piece(t, "Hom", 0.01, 0.9),
            piece(t, "burg", 0.01, 0.9),
        ];
        let asked = [piece(t, "Bad", 1.0, 0.0), piece(t, "Homburg", 1.0, 0.0)];
        assert!(!name_where_asked(t, &alone, &asked, false));
        // Read alone as a place and more as a name: a name ("do Jana
        // Kowalskiego", streets are named so too).
        let t = "Jana Kowalskiego";
        let asked = [
            piece(t, "Jana", 1.0, 0.0),
            piece(t, "Kowalskiego", 1.0, 0.0),
        ];
        let alone = [
            piece(t, "Jana", 0.45, 0.15),
            piece(t, "Ko", 0.47, 0.28),
            piece(t, "walskiego", 0.47, 0.31),
        ];
        assert!(name_where_asked(t, &alone, &asked, false));
        let alone = [
            piece(t, "Jana", 0.45, 0.15),
            piece(t, "Ko", 0.2, 0.28),
            piece(t, "walskiego", 0.2, 0.31),
        ];
        assert!(!name_where_asked(t, &alone, &asked, false));
        // One capitalised word is not enough.
        let t = "Mich";
        assert!(!name_where_asked(
            t,
            &[],
            &[piece(t, "Mich", 1.0, 0.0)],
            false
        ));
        assert!(!name_where_asked("", &[], &[], false));
        // After a key that asks for a name, the framed reading decides: a
        // place reading alone or a common last word does not keep it out;
        // one word, or one doubtful piece, still does.
        let t = "Visitación Montes";
        let alone = [
            piece(t, "Visitación", 0.2, 0.3),
            piece(t, "Montes", 0.0, 0.9),
        ];
        let asked = [
            piece(t, "Visitación", 1.0, 0.0),
            piece(t, "Montes", 1.0, 0.0),
        ];
        assert!(!name_where_asked(t, &alone, &asked, false));
        assert!(name_where_asked(t, &alone, &asked, true));
        assert!(!name_where_asked(t, &alone, &asked[..1], true));
        let doubtful = [
            piece(t, "Visitación", 1.0, 0.0),
            piece(t, "Montes", 0.5, 0.0),
        ];
        assert!(!name_where_asked(t, &alone, &doubtful, true));
        assert!(!name_where_asked(
            "Mich",
            &[],
            &[piece("Mich", "Mich", 1.0, 0.0)],
            true
        ));
    }

    fn name_piece(t: &str, w: &str, person: f32, given: f32, place: f32) -> NamePiece {
        let start = t.find(w).unwrap_or(0);
        NamePiece {
            start,
            end: start + w.len(),
            person,
            given,
            place,
        }
    }

    #[test]
    fn a_key_that_asks_for_a_name_is_where_a_name_is_asked_for() {
        let at = |t: &str, w: &str| after_name_key(t, t.find(w).unwrap_or(0));
        assert!(at(
            r#"{"id": 3, "name": "Visitación Montes-Gual"}"#,
            "Visit"
        ));
        assert!(at(r#"{"customerName":"Ana Ruiz"}"#, "Ana"));
        assert!(at("Full name: Ana Ruiz", "Ana"));
        assert!(at("full_name = 'Ana Ruiz'", "Ana"));
        assert!(at(r#"{"account_holder_name": "Ana Ruiz"}"#, "Ana"));
        assert!(!at(r#"{"city_name": "San Francisco"}"#, "San"));
        assert!(!at(r#"{"teamName": "Blue Team"}"#, "Blue"));
        assert!(!at(r#"{"note": "Ana Ruiz"}"#, "Ana"));
        assert!(!at("the name Ana Ruiz", "Ana"));
        assert!(!at("Ana Ruiz", "Ana"));
        let t = r#"{"customer_id": 3692, "name": "Visitación Montes-Gual", "note": "urgent"}"#;
        let got: Vec<&str> = rereads(t, &[e(t, "STREET_NAME", "Visitación Montes-Gual", 0.92)])
            .into_iter()
            .map(|(s, e)| &t[s..e])
            .collect();
        assert_eq!(got, ["Visitación Montes-Gual"]);
    }

    #[test]
    fn a_possessive_ending_is_not_the_names() {
        for (text, name) in [
            ("Kevin's phone", "Kevin"),
            ("Anna Smith's car", "Anna Smith"),
            ("Chris Jones' desk", "Chris Jones"),
            ("KEVIN'S", "KEVIN"),
            ("Zoë\u{2019}s cat", "Zoë"),
            ("O'Brien", "O'Brien"),
            ("O'", "O'"),
            ("'s", "'s"),
            ("Kevin", "Kevin"),
        ] {
            let end = text.find(' ').unwrap_or(text.len());
            let end = if name.contains(' ') {
                text.rfind(' ').unwrap_or(text.len())
            } else {
                end
            };
            assert_eq!(&text[..without_possessive(text, 0, end)], name, "{text}");
        }
        // Offsets off a character boundary change nothing.
        assert_eq!(without_possessive("Zoë's", 0, 3), 3);
    }

    #[test]
    fn a_capitalised_name_ends_at_its_last_capitalised_word() {
        let cut = |t: &'static str| &t[..without_lower_tail(t, 0, t.len())];
        assert_eq!(cut("Raj collapsed"), "Raj");
        assert_eq!(cut("Anna Weber fainted  "), "Anna Weber");
        assert_eq!(cut("Juan de la Cruz"), "Juan de la Cruz");
        assert_eq!(cut("Ludwig van"), "Ludwig");
        // Written in lower case, or one word: as it is.
        assert_eq!(cut("raj kumar"), "raj kumar");
        assert_eq!(cut("Raj"), "Raj");
        assert_eq!(cut("Łukasz żółw"), "Łukasz");
        assert_eq!(cut("李 明"), "李 明");
        assert_eq!(without_lower_tail("ab", 1, 9), 9);
    }

    #[test]
    fn a_name_does_not_start_with_the_verb_opening_its_sentence() {
        // (text, the finding, what is left of it)
        for (text, finding, want) in [
            ("Pay Yosef for the session.", "Pay Yosef", "Yosef"),
            ("pay ahmed for it", "pay ahmed", "ahmed"),
            ("Thanks. Tell Claude which branch.", "Tell Claude", "Claude"),
            ("\"Email  Bob the notes\"", "Email  Bob", "Bob"),
            // The verb alone: nothing is left.
            ("Meet Mei at six.", "Meet", ""),
            // A verb that is a given name too, a verb inside a sentence, a
            // name that only starts like one, a key.
            ("Ping Wu called.", "Ping Wu", "Ping Wu"),
            ("I will pay Yosef.", "pay Yosef", "pay Yosef"),
            ("Tellez Garcia called.", "Tellez Garcia", "Tellez Garcia"),
            ("Email: Bob", "Email: Bob", "Email: Bob"),
        ] {
            let start = text.find(finding).unwrap_or(0);
            let end = start + finding.len();
            let left = without_opening_verb(text, start, end);
            assert_eq!(text.get(left..end), Some(want), "{text}");
        }
        // Offsets off a character boundary or past the end change nothing.
        assert_eq!(without_opening_verb("Zoë Pay", 3, 7), 3);
        assert_eq!(without_opening_verb("Pay Bo", 0, 9), 0);
    }

    #[test]
    fn the_word_before_a_name_is_read_only_after_another_capitalised_word() {
        // (text, the name found, the word read again before it)
        for (text, name, want) in [
            ("Phone Sarah Cohen after lunch.", "Cohen", Some("Sarah")),
            ("Yesterday Sam Porter called.", "Porter", Some("Sam")),
            ("OK. Send Łukasz Nowak the key", "Nowak", Some("Łukasz")),
            // Opening its sentence, or the verb that does.
            ("Sam Porter called.", "Porter", None),
            ("Let Ama know.", "Ama", None),
            ("Thanks. Let Ama know.", "Ama", None),
            ("Hi. Phone Cohen.", "Cohen", None),
            ("Phone Sarah Cohen.", "Sarah Cohen", None),
            // After a lower-case word (the labels' own rule takes it), a
            // word of NOT_NAMES, a mark, two spaces, shouting.
            ("ask Sarah Cohen", "Cohen", None),
            ("Tell The Cohen", "Cohen", None),
            ("Tell Sarah-Cohen", "Cohen", None),
            ("Tell Sarah  Cohen", "Cohen", None),
            ("Tell SARAH Cohen", "Cohen", None),
            ("Tell, Sarah Cohen", "Cohen", None),
        ] {
            let start = text.rfind(name).unwrap_or(0);
            let got = word_before_name(text, start).and_then(|at| text.get(at..start));
            assert_eq!(got.map(str::trim_end), want, "{text}");
        }
        assert_eq!(word_before_name("Tell Zoë", 7), None);
        assert_eq!(word_before_name("Tell Zoë", 99), None);
        assert_eq!(word_before_name("", 0), None);
    }

    #[test]
    fn a_lower_case_word_that_never_names_anyone_is_no_name() {
        let t = "let me know when done, Done Cohen";
        let at = |w: &str| t.find(w).unwrap_or(0);
        assert!(never_a_name(t, at("done"), at("done") + 4));
        // Capitalised, a longer finding, part of the word, off the text.
        assert!(!never_a_name(t, at("Done"), at("Done") + 4));
        assert!(!never_a_name(t, at("Done"), t.len()));
        assert!(!never_a_name(t, at("done"), at("done") + 3));
        assert!(!never_a_name(t, t.len(), t.len() + 4));
    }

    #[test]
    fn a_given_name_is_taken_before_a_surname_only() {
        let framed = |span: &str| format!("{NAME_FRAME}{span}");
        let read = |span: &str, word: (f32, f32), next: (f32, f32)| {
            let t = framed(span);
            let (w, n) = span.split_once(' ').unwrap_or((span, ""));
            let n = n.split(' ').next().unwrap_or("");
            vec![
                name_piece(&t, w, word.0, word.1, 0.0),
                name_piece(&t, n, next.0, next.1, 0.0),
            ]
        };
        // "Sam Porter" 0.94 / given 0.03 where a name is asked for.
        let sam = "Sam Porter";
        assert!(given_where_asked(
            sam,
            &read(sam, (0.94, 0.94), (1.0, 0.03))
        ));
        // Not sure enough of the word; the word before a given name.
        assert!(!given_where_asked(
            sam,
            &read(sam, (0.89, 0.89), (1.0, 0.03))
        ));
        let priya = "Happy Priya";
        assert!(!given_where_asked(
            priya,
            &read(priya, (1.0, 1.0), (1.0, 0.84))
        ));
        // Nothing read where the word or the name stands; one word only.
        assert!(!given_where_asked(sam, &[]));
        assert!(!given_where_asked(
            sam,
            &read(sam, (0.94, 0.94), (1.0, 0.03))[..1]
        ));
        assert!(!given_where_asked(
            "Sam",
            &read("Sam", (1.0, 1.0), (1.0, 0.0))
        ));
    }

    #[test]
    fn a_degree_the_model_cut_in_two_is_not_an_identifier() {
        let t = r#"{"customer_id": 8669, "name": "Jacob Seifert B.A.", "note": "urgent"}"#;
        let got = spans(
            t,
            &[
                e(t, "GIVEN_NAME", "Jacob", 1.0),
                e(t, "SURNAME", "Seifert B", 0.86),
                e(t, "SECONDARY_ADDRESS", ".A", 0.53),
            ],
        );
        assert_eq!(got, vec![("person".into(), "Jacob Seifert B.A.".into())]);
    }

    #[test]
    fn a_sure_piece_inside_a_word_does_not_keep_its_run_from_a_second_reading() {
        let t = "Per favore inoltra il contratto a Eraldo Traversa.";
        let ents = [
            e(t, "CITY", "Era", 0.48),
            e(t, "GIVEN_NAME", "ld", 0.56),
            e(t, "CITY", "o Traversa", 0.62),
        ];
        assert!(spans(t, &ents).iter().all(|(class, _)| class != "person"));
        let got: Vec<&str> = rereads(t, &ents)
            .into_iter()
            .map(|(s, e)| &t[s..e])
            .collect();
        assert_eq!(got, ["Eraldo Traversa"]);
    }

    #[test]
    fn a_reread_name_takes_its_title_and_degree() {
        let span = |t: &str, run: &str| {
            let start = t.find(run).unwrap_or(0);
            let (s, e) = reread_name(t, start, start + run.len());
            t[s..e].to_string()
        };
        let t = "Bitte leite den Vertrag an Inken Kaul MBA. weiter.";
        assert_eq!(span(t, "Inken Kaul"), "Inken Kaul MBA.");
        let t = "Schreib eine kurze Nachricht an Detlev Fliegner B.Eng..";
        assert_eq!(span(t, "Detlev Fliegner B"), "Detlev Fliegner B.Eng.");
        let t = "Napisz do Dr. Miłosz Mich w sprawie.";
        assert_eq!(span(t, "Miłosz Mich"), "Dr. Miłosz Mich");
        // Nothing around it: the run as it is.
        let t = "Napisz do Miłosz Mich w sprawie MBA.";
        assert_eq!(span(t, "Miłosz Mich"), "Miłosz Mich");
        assert_eq!(reread_name("", 0, 0), (0, 0));
    }

    #[test]
    fn a_name_follows_words_of_address_not_articles() {
        let at = |t: &str, w: &str| name_frame_after(t, t.find(w).unwrap_or(0)) == Some(NAME_FRAME);
        assert!(at("Napisz do Miłosz Mich.", "Miłosz"));
        assert!(at("I talked to Forum Ramaswamy.", "Forum"));
        assert!(at("Rozmawiałem Z Róża Komander.", "Róża"));
        assert!(!at(
            "Schicken Sie mir die Unterlagen Montag früh.",
            "Unterlagen"
        ));
        assert!(!at("Spotkamy się w Nowa Huta.", "Nowa"));
        // German's own words are read in a German frame.
        let frame = |t: &str, w: &str| name_frame_after(t, t.find(w).unwrap_or(0));
        assert!(!at("Ich schreibe an Übersetzung Büro.", "Übersetzung"));
        assert_eq!(
            frame("Ich schreibe an Übersetzung Büro.", "Übersetzung"),
            Some(NAME_FRAME_DE)
        );
        assert_eq!(frame("Napisz do Miłosz Mich.", "Miłosz"), Some(NAME_FRAME));
        assert_eq!(frame("Spotkamy się w Nowa Huta.", "Nowa"), None);
        assert_eq!(frame("Miłosz Mich", "Miłosz"), None);
        assert!(!at("trained on Common Crawl", "Common"));
        // One space, a whole word, and something before it.
        assert!(!at("do  Miłosz Mich", "Miłosz"));
        assert!(!at("undo Miłosz Mich", "Miłosz"));
        assert!(name_frame_after("Miłosz Mich", 0).is_none());
        assert!(name_frame_after("à", 1).is_none());
        assert!(name_frame_after("", 0).is_none());
    }

    #[test]
    fn a_long_run_leads_with_its_first_two_words() {
        let head = |t: &'static str| leading_pair(t).map(|e| &t[..e]);
        assert_eq!(head("Salvador Pedraza Manuel"), Some("Salvador Pedraza"));
        assert_eq!(head("Juan de la Cruz Moreno"), Some("Juan de la Cruz"));
        assert_eq!(head("Anna Weber"), None);
        assert_eq!(
            head("Durante Cossiga-Cipolla"),
            Some("Durante Cossiga"),
            "two surnames joined by a hyphen"
        );
        assert_eq!(head("Jean-Pierre Dupont"), None);
        assert_eq!(head("Anna Dupont-martin"), None);
        assert_eq!(head("Anna Dupont--Martin"), None);
        assert_eq!(head("Ü Ab Cd"), None);
        assert_eq!(head(""), None);
    }

    #[test]
    fn rereads_take_any_text() {
        for t in [
            "",
            " ",
            "a Ü",
            "à\u{0}Ab Cd",
            "x -Ab Cd-",
            "ß Ÿÿ Ǆǆ",
            "to 'Ab 'Cd'",
        ] {
            for (s, e) in rereads(t, &[]) {
                assert!(t.get(s..e).is_some());
            }
            for o in names_after_verbs(t, &[]) {
                assert!(t.get(o.word.0..o.word.1).is_some());
            }
        }
    }

    #[test]
    fn a_lone_word_after_a_verb_is_read_as_a_request() {
        // (text, entities, [(word, the request it is read in)])
        type Case<'a> = (&'a str, Vec<Entity>, Vec<(&'a str, &'a str)>);
        let t = "Tell Bob I will be late.";
        let cases: Vec<Case> = vec![
            (t, vec![], vec![("Bob", "Please tell Bob I will be late.")]),
            // The model took it already.
            (t, vec![e(t, "GIVEN_NAME", "Bob", 0.8)], vec![]),
            // Unsure is not taken: it is read again.
            (
                t,
                vec![e(t, "GIVEN_NAME", "Bob", 0.39)],
                vec![("Bob", "Please tell Bob I will be late.")],
            ),
            // The request stops at the sentence's end; a later sentence
            // opening with a verb is one of its own.
            (
                "Give Sam a call! SEND Ana the notes.\nok",
                vec![],
                vec![
                    ("Sam", "Please give Sam a call!"),
                    ("Ana", "Please send Ana the notes."),
                ],
            ),
            // Two capitalised words are a run for `rereads`.
            ("Tell Bob Smith I will be late.", vec![], vec![]),
            // In lower case inside a sentence, the verb takes one too.
            (
                "Give Mia a call and text Anna when you land.",
                vec![],
                vec![
                    ("Mia", "Please give Mia a call and text Anna when you land."),
                    ("Anna", "Please text Anna when you land."),
                ],
            ),
            // Capitalised inside a sentence, not a verb that takes a
            // person, not a name's shape.
            ("Then Tell Bob I will be late.", vec![], vec![]),
            ("Fix Bob's bike.", vec![], vec![]),
            (
                "Tell me. Call JSON. Call iPhone. Invite Auth0 now.",
                vec![],
                vec![],
            ),
            ("Tell  Bob twice.", vec![], vec![]),
            // A request read as a sentence ends as one.
            (
                "Call Dan tomorrow morning",
                vec![],
                vec![("Dan", "Please call Dan tomorrow morning.")],
            ),
            // Where the writer does not capitalise, a lower-case word is
            // read capitalised; pronouns, articles and particles are not.
            (
                "tell bob i'll be late",
                vec![],
                vec![("bob", "Please tell Bob i'll be late.")],
            ),
            (
                "hey, can you text łucja when you land?",
                vec![],
                vec![("łucja", "Please text Łucja when you land?")],
            ),
            ("tell me. send the notes. give up. call x.", vec![], vec![]),
            // A sentence that opens capitalised keeps its lower-case words.
            ("Send feedback to the team.", vec![], vec![]),
            ("call me. Then send feedback to the team.", vec![], vec![]),
        ];
        for (text, ents, want) in cases {
            let got: Vec<(String, String)> = names_after_verbs(text, &ents)
                .into_iter()
                .map(|o| {
                    let word = &text[o.word.0..o.word.1];
                    assert_eq!(o.name.to_lowercase(), word.to_lowercase(), "{text}");
                    assert_eq!(
                        o.request.get(o.at..o.at + o.name.len()),
                        Some(o.name.as_str()),
                        "{text}"
                    );
                    (word.to_owned(), o.request)
                })
                .collect();
            let want: Vec<(String, String)> = want
                .into_iter()
                .map(|(w, r)| (w.to_owned(), r.to_owned()))
                .collect();
            assert_eq!(got, want, "{text}");
        }
        // A word written capitalised is read after "tell" too, alone,
        // where that is not the request already; one in lower case is not.
        let short = |t: &str| {
            names_after_verbs(t, &[])
                .into_iter()
                .map(|o| o.short)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            short("Email Kwame the slides before noon."),
            [Some("Please tell Kwame.".to_owned())]
        );
        assert_eq!(short("Text Mei."), [Some("Please tell Mei.".to_owned())]);
        assert_eq!(short("Tell Bob."), [None]);
        assert_eq!(short("email kwame the slides"), [None]);
        // A long sentence is cut after the name.
        let long = format!("Call Ann {}", "so ".repeat(200));
        let o = &names_after_verbs(&long, &[])[0];
        assert!(
            o.request.len() < REQUEST_FRAME.len() + 20 + REQUEST_TAIL,
            "{}",
            o.request.len()
        );
    }

    #[test]
    fn a_name_read_as_a_request_must_read_as_one_alone_too() {
        let piece = |person: f32| NamePiece {
            start: 0,
            end: 3,
            person,
            given: person,
            place: 0.0,
        };
        assert!(name_when_alone(&[piece(0.96)]));
        // "Git" alone is no name, whatever the request makes of it.
        assert!(!name_when_alone(&[piece(0.0)]));
        assert!(!name_when_alone(&[piece(0.3)]));
        // The mean of its pieces: a word read half as a name is not one.
        assert!(!name_when_alone(&[piece(0.9), piece(0.05)]));
        assert!(!name_when_alone(&[]));
        let req = "Please tell Bob I will be late.";
        let at = req.find("Bob").unwrap_or(0);
        assert!(sure_name_at(&[e(req, "GIVEN_NAME", "Bob", 0.58)], at, 3));
        // Unsure in the request, or sure of another word, or another label.
        assert!(!sure_name_at(&[e(req, "GIVEN_NAME", "Bob", 0.3)], at, 3));
        assert!(!sure_name_at(&[e(req, "GIVEN_NAME", "late", 0.9)], at, 3));
        assert!(!sure_name_at(&[e(req, "CITY", "Bob", 0.9)], at, 3));
        assert!(!sure_name_at(&[], at, 3));
    }
}
