//! Names of places that a second reading must not take for a person's.
//!
//! Where a name is asked for, the recognizer reads towns as names as readily
//! as people ("to Milton Keynes", "à Boulogne Billancourt"), and the rules
//! around it cannot tell them apart by shape. A gazetteer can: the names of
//! two or more words of every city of 15,000 people or more, every country
//! and US state (17,244 keys), from GeoNames (`data/places.txt`, written by
//! `scripts/gen-places`). A run is a place only when the whole run is one
//! of them; names of people that are also towns' ("Perry Hall") are rare:
//! 2 of 160,000 names Faker writes in eight locales.

use std::collections::HashSet;
use std::sync::LazyLock;

static NAMES: &str = include_str!("../../data/places.txt");

static KNOWN: LazyLock<HashSet<String>> = LazyLock::new(|| {
    NAMES
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(key)
        .filter(|k| !k.is_empty())
        .collect()
});

/// How a place is looked up: its Latin letters without diacritics (as the
/// detector folds them elsewhere), in lower case, with every run of
/// characters other than letters and digits one space ("Aix-en-Provence"
/// and "aix en provence" are one key).
fn key(name: &str) -> String {
    let bare = super::normalize::fold_letters(name).text.to_lowercase();
    bare.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `span`, taken whole, is the name of a known place, as written
/// or as Polish writes it after "do", "z", "od" (the genitive: "do Jeleniej
/// Góry", "z Nowego Sącza", "do Gorzowa Wielkopolskiego").
pub fn is_place(span: &str) -> bool {
    let k = key(span);
    if !k.contains(' ') {
        return false;
    }
    if KNOWN.contains(&k) {
        return true;
    }
    let words: Vec<&str> = k.split(' ').collect();
    if words.len() > 4 {
        return false;
    }
    // Every combination of each word's nominatives (at most 3 a word, so
    // at most 81 keys).
    let mut keys = vec![String::new()];
    for (n, word) in words.iter().enumerate() {
        let forms = nominatives(word);
        keys = keys
            .iter()
            .flat_map(|k| {
                forms.iter().map(move |f| {
                    if n == 0 {
                        f.clone()
                    } else {
                        format!("{k} {f}")
                    }
                })
            })
            .collect();
    }
    keys.iter().any(|k| KNOWN.contains(k))
}

/// `word` and what it would be in the nominative if it were a Polish
/// place's genitive: adjectives "-ej" or "-iej" → "-a" ("jeleniej" →
/// "jelenia", "podlaskiej" → "podlaska"), "-ego" → "-y" ("nowego" →
/// "nowy"), "-iego" → "-i" ("wielkopolskiego"); nouns "-y"/"-i" → "-a"
/// ("gory" → "gora"), "-a"/"-u" dropped ("sacza" → "sacz", "targu" →
/// "targ"). Names of people in the genitive do not meet a town this way:
/// none of 80,000 that Faker writes in eight locales did.
fn nominatives(word: &str) -> Vec<String> {
    let mut out = vec![word.to_owned()];
    let mut add = |stem: Option<&str>, end: &str| {
        if let Some(stem) = stem.filter(|s| s.len() >= 2) {
            out.push(format!("{stem}{end}"));
        }
    };
    if word.ends_with("ej") {
        add(word.strip_suffix("ej"), "a");
        add(word.strip_suffix("iej"), "a");
    } else if word.ends_with("iego") {
        add(word.strip_suffix("ego"), "");
    } else if word.ends_with("ego") {
        add(word.strip_suffix("ego"), "y");
    } else if word.ends_with('y') || word.ends_with('i') {
        add(word.get(..word.len() - 1), "a");
    } else if word.ends_with('a') || word.ends_with('u') {
        add(word.get(..word.len() - 1), "");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn towns_are_known_however_they_are_written() {
        for place in [
            "Milton Keynes",
            "Boulogne Billancourt",
            "Boulogne-Billancourt",
            "AIX EN PROVENCE",
            "Jelenia Góra",
            "Jelenia Gora",
            "Frankfurt am Main",
            "Costa Rica",
            "New Hampshire",
            "Bad Homburg",
            "Jeleniej Góry",
            "Zielonej Góry",
            "Nowego Sącza",
            "Nowego Targu",
            "Białej Podlaskiej",
            "Gorzowa Wielkopolskiego",
        ] {
            assert!(is_place(place), "{place}");
        }
    }

    #[test]
    fn people_and_parts_of_places_are_not() {
        for not in [
            "Hans Müller",
            "Błażej Potyrała",
            "Maite Reina Arroyo Milla",
            "Milton",
            "Keynes",
            "Milton Keynes Central",
            "Robert Williams",
            "Jana Kowalskiego",
            "Grzegorza Brzęczyszczykiewicza",
            "Miłosza Micha",
            "",
            "  ",
            "-",
        ] {
            assert!(!is_place(not), "{not}");
        }
    }

    #[test]
    fn any_text_is_safe() {
        for s in [
            "ą ę",
            "a b c d e f",
            "ej ego",
            "y i",
            "\u{0} \u{10FFFF}",
            "日本 東京",
        ] {
            let _ = is_place(s);
        }
    }

    #[test]
    fn the_list_is_whole() {
        assert!(KNOWN.len() > 17_000, "{}", KNOWN.len());
    }
}
