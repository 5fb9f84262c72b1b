//! Context words: what decides whether a number is a passport, a date a
//! birthday, a token a password — as Presidio's recognizers are scored by
//! the words around a match.

/// Whether any of `words` (lower case) occurs as a word in the `before`
/// bytes before `start` or the `after` bytes after `end` of `text`.
pub fn near(
    text: &str,
    start: usize,
    end: usize,
    words: &[&str],
    before: usize,
    after: usize,
) -> bool {
    let lo = floor_boundary(text, start.saturating_sub(before));
    let hi = ceil_boundary(text, end.saturating_add(after).min(text.len()));
    let (a, b) = (
        text.get(lo..start).unwrap_or(""),
        text.get(end..hi).unwrap_or(""),
    );
    contains_word(&a.to_lowercase(), words) || contains_word(&b.to_lowercase(), words)
}

/// Whether `window` (lower case) holds one of `words` not glued to letters
/// on either side.
pub fn contains_word(window: &str, words: &[&str]) -> bool {
    words.iter().any(|w| {
        window.match_indices(w).any(|(i, m)| {
            let before = window[..i].chars().next_back();
            let after = window[i + m.len()..].chars().next();
            let glued = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
            // Words ending in punctuation ("geb.") may be followed by anything.
            let ends_open = !m.ends_with(char::is_alphanumeric);
            !glued(before) && (ends_open || !glued(after))
        })
    })
}

/// The largest char boundary at or below `i`.
pub fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The smallest char boundary at or above `i`.
pub fn ceil_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Shannon entropy of `s`, bits per character.
pub fn entropy(s: &str) -> f32 {
    let mut counts = std::collections::HashMap::new();
    let mut n = 0usize;
    for c in s.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    counts
        .values()
        .map(|&k| {
            let p = k as f32 / n as f32;
            -p * p.log2()
        })
        .sum()
}

/// Words that say a date is a birthday.
pub const BIRTH: &[&str] = &[
    "born",
    "birth",
    "birthday",
    "birthdate",
    "dob",
    "d.o.b",
    "b.",
    "geboren",
    "geburtsdatum",
    "geburtstag",
    "geb.",
    "né",
    "née",
    "naissance",
    "nacido",
    "nacida",
    "nacimiento",
    "nací",
    "naci",
    "nato",
    "nata",
    "nascita",
    "urodzony",
    "urodzona",
    "urodzenia",
    "urodzin",
    "urodziłem",
    "urodziłam",
    "urodził",
    "urodziła",
    "data ur",
    "जन्म",
    "janm",
    "date de naiss",
];

/// Words that say a number is a passport's.
pub const PASSPORT: &[&str] = &[
    "passport",
    "reisepass",
    "reisepassnummer",
    "pass-nr",
    "passnummer",
    "passeport",
    "pasaporte",
    "passaporto",
    "paszport",
    "paszportu",
    "pasport",
    "पासपोर्ट",
    "travel document",
];

/// Words that say a number is a medical record's.
pub const MEDICAL: &[&str] = &[
    "mrn",
    "medical record",
    "patient id",
    "patient number",
    "patient no",
    "hospital number",
    "chart number",
    "health record",
    "nhs number",
    "patientennummer",
    "patienten-id",
    "patientenid",
    "krankenakte",
    "dossier médical",
    "numéro de dossier",
    "numéro patient",
    "historia clínica",
    "número de historia",
    "cartella clinica",
    "numero paziente",
    "numer pacjenta",
    "numer historii",
];

/// Words that say a number is a phone number.
pub const PHONE: &[&str] = &[
    "phone",
    "tel",
    "tel.",
    "telephone",
    "mobile",
    "cell",
    "call",
    "fax",
    "whatsapp",
    "sms",
    "text me",
    "ring",
    "dial",
    "contact",
    "telefon",
    "telefonnummer",
    "handy",
    "rufnummer",
    "téléphone",
    "tél",
    "tél.",
    "portable",
    "appeler",
    "appelez",
    "teléfono",
    "móvil",
    "movil",
    "llamar",
    "llama",
    "telefono",
    "cellulare",
    "chiamare",
    "chiama",
    "telefonu",
    "komórka",
    "komórkowy",
    "zadzwoń",
    "फ़ोन",
    "फोन",
    "mob",
    "mob.",
    "ph",
    "ph.",
    "my number",
    "reach me",
    "reach us",
    "reach the office",
    "ruf mich",
    "rufen sie",
    "anrufen",
    "erreichbar",
    "mon numéro",
    "mi número",
    "il mio numero",
    "numer telefonu",
    "mój numer",
];

/// Words that say a number is not personal: a shipment, an order, a version.
pub const NOT_PERSONAL: &[&str] = &[
    "tracking",
    "shipment",
    "parcel",
    "sendung",
    "sendungsnummer",
    "suivi",
    "seguimiento",
    "tracciamento",
    "przesyłki",
    "version",
    "release",
    "build",
    "sku",
    "isbn",
    "invoice no",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_must_stand_alone_and_windows_respect_char_boundaries() {
        let t = "Über die Größe: born in Köln";
        let at = t.find("Köln").unwrap();
        assert!(near(t, at, t.len(), BIRTH, 20, 0));
        assert!(!contains_word("hotel room", &["tel"]));
        assert!(contains_word("tel: 555", &["tel"]));
        assert!(contains_word("geb.12", &["geb."]));
        // A window edge inside a multi-byte character does not panic.
        assert!(!near("ééééé12", 10, 12, BIRTH, 3, 3));
        assert!(entropy("aaaa") < 0.1 && entropy("aB3$xY9!") > 2.9);
    }
}
