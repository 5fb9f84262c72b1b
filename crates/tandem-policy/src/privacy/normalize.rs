//! Folding the digits of other scripts (full-width, Arabic-Indic, Devanagari,
//! and every other Unicode decimal digit block the patterns might meet) to
//! ASCII before pattern matching, so that `१२३-४५-६७८९` is found as the
//! number it is — and with them the separators numbers are written with
//! outside ASCII (no-break and thin spaces, as French and word processors
//! put between a number's groups; non-breaking hyphens and en dashes) and
//! a URL's encoded `@` (`%40`) — and mapping what is found back to the
//! original text's byte offsets.

/// Unicode blocks of decimal digits: the code point of each block's zero.
/// Every block holds ten consecutive digits.
const ZEROS: &[u32] = &[
    0x0660, // Arabic-Indic
    0x06F0, // Extended Arabic-Indic
    0x07C0, // NKo
    0x0966, // Devanagari
    0x09E6, // Bengali
    0x0A66, // Gurmukhi
    0x0AE6, // Gujarati
    0x0B66, // Oriya
    0x0BE6, // Tamil
    0x0C66, // Telugu
    0x0CE6, // Kannada
    0x0D66, // Malayalam
    0x0DE6, // Sinhala
    0x0E50, // Thai
    0x0ED0, // Lao
    0x0F20, // Tibetan
    0x1040, // Myanmar
    0x17E0, // Khmer
    0x1810, // Mongolian
    0xFF10, // Full-width
];

fn ascii_digit(c: char) -> Option<char> {
    let cp = c as u32;
    ZEROS
        .iter()
        .find(|&&z| (z..z + 10).contains(&cp))
        .and_then(|&z| char::from_digit(cp - z, 10))
}

/// A text with other scripts' digits folded to ASCII, and where each of its
/// bytes came from.
#[derive(Debug)]
pub struct Folded<'a> {
    /// The folded text; borrowed when nothing needed folding.
    pub text: std::borrow::Cow<'a, str>,
    /// For each byte of `text` (and one past the end), the offset in the
    /// original; empty when nothing was folded (offsets are the same).
    map: Vec<usize>,
}

impl Folded<'_> {
    /// The original byte offset of folded offset `i`.
    pub fn original(&self, i: usize) -> usize {
        if self.map.is_empty() {
            i
        } else {
            self.map
                .get(i)
                .copied()
                .unwrap_or_else(|| *self.map.last().unwrap_or(&0))
        }
    }
}

impl<'a> Folded<'a> {
    /// `text` as it is.
    pub fn plain(text: &'a str) -> Folded<'a> {
        Folded {
            text: std::borrow::Cow::Borrowed(text),
            map: Vec::new(),
        }
    }
}

/// A folded text being written: each piece pushed with the original
/// offset it stands for.
struct Builder<'a> {
    text: &'a str,
    out: String,
    map: Vec<usize>,
}

impl<'a> Builder<'a> {
    fn new(text: &'a str) -> Self {
        Builder {
            text,
            out: String::with_capacity(text.len() + 16),
            map: Vec::with_capacity(text.len() + 17),
        }
    }

    /// Appends `piece`, every byte of it from original offset `at`.
    fn push(&mut self, at: usize, piece: &str) {
        self.map.extend(std::iter::repeat_n(at, piece.len()));
        self.out.push_str(piece);
    }

    fn finish(mut self) -> Folded<'a> {
        self.map.push(self.text.len());
        Folded {
            text: std::borrow::Cow::Owned(self.out),
            map: self.map,
        }
    }
}

/// Whether a character is a Latin letter with a diacritic or a Latin
/// letter outside ASCII ("ł", "ø", "ß").
fn latin_beyond_ascii(c: char) -> bool {
    matches!(c as u32, 0x00C0..=0x024F | 0x1E00..=0x1EFF) && c.is_alphabetic()
}

/// `text` with its Latin letters written without diacritics ("Błażej" →
/// "Blazej", "Straße" → "Strasse"), other characters as they are.
pub fn fold_letters(text: &str) -> Folded<'_> {
    if !text.chars().any(latin_beyond_ascii) {
        return Folded::plain(text);
    }
    let mut b = Builder::new(text);
    for (at, c) in text.char_indices() {
        let bare = Some(c)
            .filter(|&c| latin_beyond_ascii(c))
            .and_then(deunicode::deunicode_char)
            .filter(|s| !s.is_empty() && s.chars().all(|b| b.is_ascii_alphabetic()));
        match bare {
            Some(s) => b.push(at, s),
            None => b.push(at, c.encode_utf8(&mut [0; 4])),
        }
    }
    b.finish()
}

/// The ASCII separator a number's groups are written with that `c` stands
/// for: a space for Unicode's spaces (no-break, thin, figure, ideographic
/// and the rest), a hyphen for its hyphens and dashes short of the em dash
/// (which separates clauses, not digits).
fn ascii_separator(c: char) -> Option<char> {
    match c {
        '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}' | '\u{202f}' | '\u{205f}' | '\u{3000}' => {
            Some(' ')
        }
        '\u{2010}'..='\u{2013}' | '\u{2212}' | '\u{fe63}' | '\u{ff0d}' => Some('-'),
        _ => None,
    }
}

/// What `c` is folded to, if anything.
fn folded(c: char) -> Option<char> {
    if c.is_ascii() {
        None
    } else {
        ascii_digit(c).or_else(|| ascii_separator(c))
    }
}

/// Folds `text`'s digits and separators.
pub fn fold(text: &str) -> Folded<'_> {
    if !text.chars().any(|c| folded(c).is_some()) && !text.contains("%40") {
        return Folded::plain(text);
    }
    let mut b = Builder::new(text);
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        // An encoded `@` is one character of the folded text, mapped to
        // the start of its three.
        if c == '%' && text[at..].starts_with("%40") {
            chars.next();
            chars.next();
            b.push(at, "@");
            continue;
        }
        b.push(at, folded(c).unwrap_or(c).encode_utf8(&mut [0; 4]));
    }
    b.finish()
}

/// Whether `c` belongs to a script written without spaces between words
/// (Chinese, Japanese, Korean with its particles, Thai, Lao, Khmer,
/// Myanmar).
fn unspaced(c: char) -> bool {
    matches!(c as u32,
        0x0E00..=0x0EFF // Thai, Lao
        | 0x1000..=0x109F // Myanmar
        | 0x1780..=0x17FF // Khmer
        | 0x2E80..=0x9FFF // CJK radicals and punctuation, kana, ideographs
        | 0xAC00..=0xD7AF // Hangul syllables
        | 0xF900..=0xFAFF // CJK compatibility ideographs
        | 0xFF00..=0xFFEF // full-width forms
        | 0x20000..=0x3134F) // CJK extensions
}

/// `text` with a space between a letter or digit of a script written
/// with spaces and one written without (`请联系Jane Doe明天` → `请联系 Jane
/// Doe 明天`), where a Latin name set in such text touches its words.
pub fn spaced(text: &str) -> Folded<'_> {
    let spaced_word = |c: char| c.is_alphanumeric() && !unspaced(c);
    let boundary = |a: char, b: char| {
        (unspaced(a) && a.is_alphanumeric() && spaced_word(b))
            || (spaced_word(a) && unspaced(b) && b.is_alphanumeric())
    };
    let mut prev = None;
    if !text.chars().any(|c| {
        let cut = prev.is_some_and(|p| boundary(p, c));
        prev = Some(c);
        cut
    }) {
        return Folded::plain(text);
    }
    let mut b = Builder::new(text);
    let mut prev = None;
    for (at, c) in text.char_indices() {
        if prev.is_some_and(|p| boundary(p, c)) {
            // The space stands for where the next character starts.
            b.push(at, " ");
        }
        b.push(at, c.encode_utf8(&mut [0; 4]));
        prev = Some(c);
    }
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin_letters_lose_their_diacritics_and_map_back() {
        let t = "do Błażej Potyrała, Straße";
        let f = fold_letters(t);
        assert_eq!(f.text, "do Blazej Potyrala, Strasse");
        let start = f.text.find("Potyrala").unwrap();
        let end = start + "Potyrala".len();
        assert_eq!(&t[f.original(start)..f.original(end)], "Potyrała");
        let start = f.text.find("Strasse").unwrap();
        assert_eq!(&t[f.original(start)..f.original(f.text.len())], "Straße");
        // Other scripts and plain ASCII stay as they are.
        assert_eq!(fold_letters("Дмитрий 北京").text, "Дмитрий 北京");
        assert!(matches!(
            fold_letters("Anna Weber").text,
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn digits_of_other_scripts_fold_and_map_back() {
        let t = "SSN १२३-४५-६७८९ ok";
        let f = fold(t);
        assert_eq!(f.text, "SSN 123-45-6789 ok");
        let start = f.text.find('1').unwrap();
        let end = f.text.find(" ok").unwrap();
        assert_eq!(&t[f.original(start)..f.original(end)], "१२३-४५-६७८९");
        let w = fold("ＩＤ：１２３");
        assert_eq!(w.text, "ＩＤ：123");
        assert!(matches!(
            fold("plain 123").text,
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn latin_words_in_unspaced_scripts_stand_apart_and_map_back() {
        let t = "请联系Jane Doe明天。";
        let f = spaced(t);
        assert_eq!(f.text, "请联系 Jane Doe 明天。");
        let start = f.text.find("Jane").unwrap();
        let end = start + "Jane Doe".len();
        assert_eq!(&t[f.original(start)..f.original(end)], "Jane Doe");
        assert_eq!(spaced("โทรหาJohn Smithพรุ่งนี้").text, "โทรหา John Smith พรุ่งนี้");
        // Nothing to do: borrowed as it is.
        for t in ["Call Jane Doe.", "请联系 Jane Doe 明天。", "日本語だけ", ""] {
            assert!(
                matches!(spaced(t).text, std::borrow::Cow::Borrowed(_)),
                "{t}"
            );
        }
    }
}
