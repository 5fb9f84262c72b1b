//! Privacy end to end: a device Tandem with the personal-data model, a real
//! local model, and a capturing upstream that records every byte that
//! leaves. Personal data is put in every field a request can carry; strict
//! mode must send none of it, redact mode must send placeholders and give
//! the client back the originals, streamed or not.

use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_embed::TokenClassifier;
use tandem_policy::privacy::PrivacyConfig;
use tandem_policy::{PolicyConfig, Rule};
use tandem_router::{Dispatcher, ModelRecognizer};
use tandem_testkit::capture::{CaptureUpstream, Mode};
use tandem_testkit::{
    RAMPART, SMOLLM2, TestServer, model_path, post_json, shared_engine, sse_text,
};

fn classifier() -> Arc<TokenClassifier> {
    static C: OnceLock<Arc<TokenClassifier>> = OnceLock::new();
    C.get_or_init(|| {
        let dir = model_path(RAMPART);
        Arc::new(TokenClassifier::load(dir.parent().unwrap()).expect("load the recognizer"))
    })
    .clone()
}

/// Cloud first, so that only the privacy rule keeps a request home.
fn cloud_first() -> PolicyConfig {
    let mut p = PolicyConfig::default();
    p.rules.retain(|r| *r != Rule::PreferLocal);
    p.rules.push(Rule::PreferCloud);
    p
}

struct Setup {
    device: TestServer,
    capture: CaptureUpstream,
}

async fn setup(recognizer: Result<(), &str>) -> Setup {
    setup_with(recognizer, Default::default()).await
}

/// As [`setup`], with a `[privacy]` section of its own.
async fn setup_with(recognizer: Result<(), &str>, privacy: PrivacyConfig) -> Setup {
    let capture = CaptureUpstream::start(None, Mode::Echo).await;
    let mut b = Dispatcher::builder()
        .local(shared_engine(SMOLLM2, 2048, 4))
        .cloud(
            CloudBackend::new(UpstreamConfig::new("cloud", &capture.base_url(), &["big"])).unwrap(),
        )
        .policy(cloud_first())
        .privacy(privacy);
    b = match recognizer {
        Ok(()) => b.recognizer(Arc::new(ModelRecognizer(classifier()))),
        Err(why) => b.recognizer_unavailable(why),
    };
    Setup {
        device: TestServer::start(b.build().unwrap()).await,
        capture,
    }
}

/// The deployment's own words (`[privacy] allow_list`) go out as written,
/// through a real server: a library the model takes for a person is not
/// replaced, a person in the same message still is, and the client gets
/// both back.
#[tokio::test]
async fn allowed_words_leave_as_they_are_and_people_do_not() {
    let s = setup_with(
        Ok(()),
        PrivacyConfig {
            allow_list: vec!["lodash".into(), " SIDEKIQ  ".into()],
            ..Default::default()
        },
    )
    .await;
    let user = "Write a Sidekiq job that sends a welcome email, and tell Bob I will be late.";
    let r = post_json(
        &s.device.url("/v1/chat/completions"),
        &json!({"model": "tandem/auto", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": user}]}),
        &[("x-tandem-privacy", "redact")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-tandem-redacted"), "person=1");
    let sent = s.capture.captured()[0].json();
    assert_eq!(
        sent["messages"][0]["content"],
        "Write a Sidekiq job that sends a welcome email, and tell [PERSON_1] I will be late."
    );
    assert_eq!(
        r.body["choices"][0]["message"]["content"],
        format!("ECHO: {user}")
    );
}

/// The values planted below; none may ever reach the upstream.
const PLANTED: &[&str] = &[
    "Hans",
    "Müller",
    "Hauptstraße",
    "jane.doe@example.com",
    "123-45-6789",
    "4111 1111 1111 1111",
    "+44 20 7946 0958",
    "DE89 3704 0044 0532 0130 00",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AKIAIOSFODNN7EXAMPLE",
    "Priya Sharma",
    "owner@corp.example",
    "12.03.1985",
];

/// A request with personal data in every place a request carries text.
fn body(stream: bool) -> Value {
    json!({
        "model": "tandem/auto",
        "stream": stream,
        "max_tokens": 8,
        "temperature": 0,
        "user": "jane.doe@example.com",
        "metadata": {"owner@corp.example": "billing", "note": "born 12.03.1985"},
        "messages": [
            {"role": "system", "content": "Ticket for Priya Sharma.", "name": "jane.doe@example.com"},
            {"role": "user", "content": "Look up my account.", "x-extra": {"ssn": "123-45-6789"}},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "lookup", "arguments": "{\"card\": \"4111 1111 1111 1111\", \"iban\": \"DE89 3704 0044 0532 0130 00\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{\"phone\": \"+44 20 7946 0958\", \"aws\": \"AKIAIOSFODNN7EXAMPLE\"}"},
            {"role": "user", "content": "My name is Hans Müller, I live at Hauptstraße 5, 10115 Berlin. aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
        ],
    })
}

fn leaked(capture: &CaptureUpstream) -> Vec<String> {
    let sent: Vec<u8> = capture
        .captured()
        .iter()
        .flat_map(|c| c.body.to_vec())
        .collect();
    let sent = String::from_utf8_lossy(&sent).into_owned();
    // JSON escapes non-ASCII and slashes differently: compare decoded too.
    let decoded: String = capture
        .captured()
        .iter()
        .map(|c| c.json().to_string())
        .collect();
    PLANTED
        .iter()
        .filter(|p| sent.contains(*p) || decoded.contains(*p))
        .map(|p| (*p).to_owned())
        .collect()
}

#[tokio::test]
async fn strict_mode_sends_nothing_from_any_field() {
    let s = setup(Ok(())).await;
    for stream in [false, true] {
        let r = post_json(
            &s.device.url("/v1/chat/completions"),
            &body(stream),
            &[("x-tandem-privacy", "strict")],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-tandem-backend"), "local");
        let reasons = r.header("x-tandem-reasons");
        assert!(reasons.contains("strict mode"), "{reasons}");
        assert!(
            reasons.contains("person") && reasons.contains("address"),
            "{reasons}"
        );
    }
    assert!(
        s.capture.captured().is_empty(),
        "something left: {:?}",
        leaked(&s.capture)
    );
    // Each field alone is enough to keep a request home.
    let cases = [
        json!({"messages": [{"role": "user", "content": "hi", "name": "jane.doe@example.com"}]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "user": "owner@corp.example"}),
        json!({"messages": [{"role": "user", "content": "hi"}], "metadata": {"owner@corp.example": "x"}}),
        json!({"messages": [{"role": "user", "content": "hi", "x-extra": "SSN 123-45-6789"}]}),
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"card\": \"4111 1111 1111 1111\"}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}, {"role": "user", "content": "and?"}]}),
        json!({"messages": [{"role": "user", "content": "Please greet Hans Müller from Berlin."}]}),
    ];
    for mut case in cases {
        case["model"] = json!("tandem/auto");
        case["max_tokens"] = json!(4);
        let r = post_json(
            &s.device.url("/v1/chat/completions"),
            &case,
            &[("x-tandem-privacy", "strict")],
        )
        .await;
        assert_eq!(
            r.header("x-tandem-backend"),
            "local",
            "{case}: {:?}",
            r.body
        );
    }
    assert!(s.capture.captured().is_empty());
}

#[tokio::test]
async fn redact_mode_sends_placeholders_and_restores_the_answer() {
    let s = setup(Ok(())).await;
    let user = body(false)["messages"][4]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let want = format!("ECHO: {user}");
    for stream in [false, true] {
        let url = s.device.url("/v1/chat/completions");
        let text = if stream {
            let r = reqwest::Client::new()
                .post(&url)
                .header("x-tandem-privacy", "redact")
                .json(&body(true))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert!(
                r.headers()["x-tandem-backend"]
                    .to_str()
                    .unwrap()
                    .starts_with("cloud")
            );
            sse_text(&r.text().await.unwrap())
        } else {
            let r = post_json(&url, &body(false), &[("x-tandem-privacy", "redact")]).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let redacted = r.header("x-tandem-redacted");
            for class in [
                "person",
                "address",
                "email",
                "secret",
                "national_id",
                "card_number",
                "iban",
                "phone",
            ] {
                assert!(redacted.contains(class), "{class} not in {redacted}");
            }
            r.text()
        };
        // The client sees its own words, whatever the upstream saw.
        assert_eq!(text, want);
    }
    assert_eq!(s.capture.captured().len(), 2);
    assert!(
        leaked(&s.capture).is_empty(),
        "leaked: {:?}",
        leaked(&s.capture)
    );
    let sent = s.capture.captured()[0].json();
    let last = sent["messages"][4]["content"].as_str().unwrap();
    assert!(
        last.contains("[PERSON_") && last.contains("[ADDRESS_"),
        "{last}"
    );
}

#[tokio::test]
async fn a_detector_that_cannot_run_keeps_everything_home() {
    let s = setup(Err("the personal-data model could not be loaded")).await;
    for mode in ["strict", "redact"] {
        let r = post_json(
            &s.device.url("/v1/chat/completions"),
            &json!({"model": "tandem/auto", "max_tokens": 4,
                "messages": [{"role": "user", "content": "Nothing personal here."}]}),
            &[("x-tandem-privacy", mode)],
        )
        .await;
        assert_eq!(r.status, 200, "{mode}: {:?}", r.body);
        assert_eq!(r.header("x-tandem-backend"), "local", "{mode}");
        assert!(
            r.header("x-tandem-reasons")
                .contains("could not be checked")
        );
    }
    // With privacy off the request may leave.
    let r = post_json(
        &s.device.url("/v1/chat/completions"),
        &json!({"model": "tandem/auto", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Nothing personal here."}]}),
        &[("x-tandem-privacy", "off")],
    )
    .await;
    assert!(r.header("x-tandem-backend").starts_with("cloud"));
}

#[tokio::test]
async fn an_unreadable_privacy_header_is_refused_not_ignored() {
    let s = setup(Ok(())).await;
    for value in [&b"str\xffict"[..], b"everything"] {
        let r = reqwest::Client::new()
            .post(s.device.url("/v1/chat/completions"))
            .header(
                "x-tandem-privacy",
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            )
            .json(&json!({"model": "tandem/auto", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], "x-tandem-privacy");
    }
    assert!(s.capture.captured().is_empty());
}

#[tokio::test]
async fn the_dry_run_says_what_was_found_but_not_the_values() {
    let s = setup(Ok(())).await;
    let r = post_json(
        &s.device.url("/v1/tandem/route"),
        &json!({"messages": [{"role": "user", "content": "Mail jane.doe@example.com and bob@example.org about Hans Müller."}]}),
        &[("x-tandem-privacy", "strict")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["features"]["pii"]["email"], 2);
    assert!(r.body["features"]["pii"]["person"].as_u64().unwrap_or(0) >= 1);
    let text = r.body.to_string();
    assert!(!text.contains("jane.doe") && !text.contains("Müller"));
}

/// A data URL whose base64 happens to hold a secret-shaped run: it is an
/// image, not text, and must leave (when it may) byte for byte.
const IMAGE: &str = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

fn with_media(stream: bool) -> Value {
    json!({
        "model": "tandem/auto",
        "stream": stream,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Who is this? Mail jane.doe@example.com. "},
            {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
            {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA", "format": "wav"}},
            {"type": "text", "text": "Thanks."},
        ]}],
    })
}

#[tokio::test]
async fn images_and_audio_leave_as_sent_and_only_as_privacy_allows() {
    let s = setup(Ok(())).await;
    let url = s.device.url("/v1/chat/completions");
    let sent_parts = with_media(false)["messages"][0]["content"].clone();
    let want = "ECHO: Who is this? Mail jane.doe@example.com. Thanks.";

    // Privacy off: the parts reach the upstream exactly as sent, in order.
    let r = post_json(&url, &with_media(false), &[("x-tandem-privacy", "off")]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.header("x-tandem-backend").starts_with("cloud"));
    assert_eq!(
        s.capture.captured()[0].json()["messages"][0]["content"],
        sent_parts
    );

    // Redact: the text parts go out with placeholders, the image and the
    // audio untouched; the answer comes back with the original, streamed
    // or not.
    for stream in [false, true] {
        let r = reqwest::Client::new()
            .post(&url)
            .header("x-tandem-privacy", "redact")
            .json(&with_media(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let redacted = r.headers()["x-tandem-redacted"]
            .to_str()
            .unwrap()
            .to_owned();
        // Only what was replaced is named there; the media went as sent.
        assert_eq!(redacted, "email=1");
        let raw = r.text().await.unwrap();
        let text = if stream {
            sse_text(&raw)
        } else {
            let v: Value = serde_json::from_str(&raw).unwrap();
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(text, want);
        let out = s.capture.captured().last().unwrap().json();
        let parts = &out["messages"][0]["content"];
        assert!(
            parts[0]["text"].as_str().unwrap().contains("[EMAIL_"),
            "{parts}"
        );
        assert!(!out.to_string().contains("jane.doe"));
        assert_eq!(parts[1], sent_parts[1]);
        assert_eq!(parts[2], sent_parts[2]);
        assert_eq!(parts[3], sent_parts[3]);
    }
    let before = s.capture.captured().len();
    // The decision counts what could not be read, as it counts findings.
    let r = post_json(
        &s.device.url("/v1/tandem/route"),
        &with_media(false),
        &[("x-tandem-privacy", "redact")],
    )
    .await;
    assert_eq!(r.body["features"]["pii"]["image"], 1, "{:?}", r.body);
    assert_eq!(r.body["features"]["pii"]["audio"], 1);
    assert_eq!(r.body["features"]["pii"]["email"], 1);

    // Strict: what cannot be read cannot be shown to be free of personal
    // data, so it stays home — and the local model cannot look at images.
    let r = post_json(
        &url,
        &json!({"model": "tandem/auto", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}),
        &[("x-tandem-privacy", "strict")],
    )
    .await;
    assert!((400..500).contains(&r.status), "{:?}", r.body);
    let message = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("image"), "{message}");
    assert_eq!(s.capture.captured().len(), before, "nothing may leave");
}

/// The detector with the real personal-data model.
fn model_detector() -> tandem_policy::privacy::Detector {
    tandem_policy::privacy::Detector::new(&[])
        .unwrap()
        .with_recognizer(Arc::new(ModelRecognizer(classifier())))
}

/// `text` holds a finding of `class` spanning exactly `want`.
fn assert_finds(d: &tandem_policy::privacy::Detector, text: &str, class: &str, want: &str) {
    let found = d.find(text).unwrap();
    assert!(
        found
            .iter()
            .any(|f| f.class == class && &text[f.start..f.end] == want),
        "{text}: {found:?}"
    );
}

/// `text` redacted afresh (placeholders numbered from 1) is `want`.
fn assert_redacts(d: &tandem_policy::privacy::Detector, text: &str, want: &str) {
    let mut r = tandem_policy::privacy::Redaction::default();
    assert_eq!(r.redact(d, text).unwrap(), want);
}

/// Names at the end of a sentence after a preposition, where the model
/// alone reads a town or nothing: read again on their own (or, where the
/// model does not know them at all, where a name is asked for), they are
/// found; places and product names in the same position are not taken for
/// names.
#[test]
fn names_after_a_preposition_are_found_and_places_are_not() {
    let d = model_detector();
    for (text, name) in [
        (
            "Merci de transmettre le dossier à Thomas Marin.",
            "Thomas Marin",
        ),
        ("Proszę przekazać umowę do Rozalia Wita.", "Rozalia Wita"),
        (
            "Per favore inoltra il contratto a Massimo Leone.",
            "Massimo Leone",
        ),
        (
            "Merci de transmettre le dossier à Margot de la Langlois.",
            "Margot de la Langlois",
        ),
        // Alone, the model's belief in "Mennea" is split between the name
        // labels, none of which wins on its own.
        (
            "Per favore inoltra il contratto a Pasqual Mennea.",
            "Pasqual Mennea",
        ),
        (
            "Envoyez le contrat à Marie Dupont-Martin.",
            "Marie Dupont-Martin",
        ),
        // Three words read as nothing; the first two read as a name.
        (
            "Ayer hablé con Salvador Pedraza Manuel sobre la factura.",
            "Salvador Pedraza Manuel",
        ),
        (
            "Bitte leite den Vertrag an Ing. Rene Franke weiter.",
            "Ing. Rene Franke",
        ),
        // Read as nothing even alone; where a name is asked for, a name.
        (
            "Napisz do Grzegorz Brzęczyszczykiewicz w sprawie faktury.",
            "Grzegorz Brzęczyszczykiewicz",
        ),
        // Only without its diacritics.
        (
            "Proszę przekazać umowę do Błażej Potyrała.",
            "Błażej Potyrała",
        ),
        // After a German preposition, where a German frame asks for a name.
        (
            "Schreib eine kurze Nachricht an Detlev Fliegner.",
            "Detlev Fliegner",
        ),
        // A Polish name in the genitive, as Polish writes it after "do":
        // in its sentence the model reads a street (streets are named so).
        (
            "Proszę przekazać dokumenty do Jana Kowalskiego.",
            "Jana Kowalskiego",
        ),
        // With the degree that ends the second reading's run.
        (
            "Bitte leite den Vertrag an Inken Kaul MBA. weiter.",
            "Inken Kaul MBA.",
        ),
        (
            "Schreib eine kurze Nachricht an Detlev Fliegner B.Eng..",
            "Detlev Fliegner B.Eng.",
        ),
        ("I talked to Forum Ramaswamy about it.", "Forum Ramaswamy"),
        ("Please send the keys to Om Sinha tomorrow.", "Om Sinha"),
        (
            "Wczoraj rozmawiałem z Róża Komander o fakturze.",
            "Róża Komander",
        ),
        // The halves of a double-barrelled surname read apart: the second
        // as a town.
        (
            "Ayer hablé con Alcides Soria-Escudero sobre la factura.",
            "Alcides Soria-Escudero",
        ),
        // A given name that is also a word ("durante": during) before a
        // double-barrelled surname reads as nothing, with the surname's
        // first half alone as a name.
        (
            "Scrivi un messaggio per Durante Cossiga-Cipolla.",
            "Durante Cossiga-Cipolla",
        ),
        // Sure of the surname, not of the given name before it.
        (
            "Please forward the contract to Alex Cox before Friday.",
            "Alex Cox",
        ),
        // A sentence opening with a word a name follows: any verb that
        // takes a person.
        ("Add Max Misra to the guest list.", "Max Misra"),
        ("Send Grace Mensah the photos.", "Grace Mensah"),
        ("Text Grace Mensah when you land.", "Grace Mensah"),
        ("Please phone Aiko Tanaka tomorrow.", "Aiko Tanaka"),
        // One word piece inside the name read as a given name, the rest as
        // a town.
        (
            "Per favore inoltra il contratto a Eraldo Traversa.",
            "Eraldo Traversa",
        ),
        // A key that asks for a name; in its sentence and alone the model
        // reads a street or a town.
        (
            r#"{"customer_id": 3692, "name": "Visitación Montes-Gual", "note": "urgent"}"#,
            "Visitación Montes-Gual",
        ),
        (
            r#"{"customer_id": 8669, "name": "Jacob Seifert B.A.", "note": "urgent"}"#,
            "Jacob Seifert B.A.",
        ),
    ] {
        assert_finds(&d, text, "person", name);
    }
    for text in [
        "Deploy the service to Google Cloud today.",
        "The conference moved to Monte Carlo.",
        "Open the project in Visual Studio Code.",
        "We shipped the parcels to Rio de Janeiro.",
        "Il treno per Reggio Emilia parte alle otto.",
        "Die Tour führt auf den Monte Rosa.",
        // Read as names where a name is asked for, but ending in a word
        // too common to be a name the model does not know.
        "Our servers run on Red Hat and some on Ubuntu.",
        "She drives an Alfa Romeo to work.",
        "The store has big discounts on Black Friday this year.",
        "He works at Goldman Sachs in the risk team.",
        // German writes nouns with a capital; after an article they are
        // not read where a name is asked for.
        "Bitte schicken Sie mir die Unterlagen Montag früh.",
        "Im Anhang findest du die Präsentation Folien für morgen.",
        // Nor after German's prepositions, where a German frame asks
        // for a person.
        "Die Unterlagen sind für Prüfung Ergebnisse gedacht.",
        "Ich schreibe morgen an Übersetzung Büro.",
        // Openings a name may follow, followed by what is not one.
        "Add Google Drive to the toolbar.",
        "Call Customer Support if it fails.",
        "Send Google Analytics the events.",
        "Give Visual Studio more memory.",
        "Text Customer Support about the refund.",
        // A key asking for a name, holding a service's.
        r#"{"name": "Customer Support", "note": "urgent"}"#,
        r#"{"id": 7, "name": "Google Drive"}"#,
        // Towns the model reads as names where a name is asked for: known
        // places, as written or in Polish's genitive.
        "Next week I am driving to Milton Keynes for the conference.",
        "We moved the office to Bishops Stortford last spring.",
        "Le colis part demain à Boulogne Billancourt.",
        "Vamos a Las Palmas en agosto.",
        "Wczoraj wróciłem z Zielonej Góry.",
        "Jutro jadę do Jeleniej Góry na narty.",
    ] {
        assert!(d.find(text).unwrap().is_empty(), "{text}");
    }
}

/// Addresses the model labels in parts, with gaps it leaves unlabelled (a
/// state's code, a flat number, a town after its postcode, a province): one
/// address, whole, so none of it leaves with redaction.
#[test]
fn addresses_are_found_whole() {
    let d = model_detector();
    for (text, address) in [
        (
            "Please update my billing address to 683 Robert Hollow, Lopezland, IN 80162.",
            "683 Robert Hollow, Lopezland, IN 80162",
        ),
        (
            r#"{"address": "72204 Kristine Vista Suite 569, West Philliptown, AS 99292"}"#,
            "72204 Kristine Vista Suite 569, West Philliptown, AS 99292",
        ),
        (
            "Spedisci il pacco a Vicolo Giammusso, 82 Appartamento 1, 25044, Capo Di Ponte (BS).",
            "Vicolo Giammusso, 82 Appartamento 1, 25044, Capo Di Ponte (BS)",
        ),
        (
            "Il mio nuovo indirizzo è Rotonda Tremonti, 50 Appartamento 45, 30032, Fiesso D'Artico (VE).",
            "Rotonda Tremonti, 50 Appartamento 45, 30032, Fiesso D'Artico (VE)",
        ),
        (
            "Mi nueva dirección es Ronda Morena Miguel 851 Apt. 95 , La Coruña, 49226.",
            "Ronda Morena Miguel 851 Apt. 95 , La Coruña, 49226",
        ),
        (
            "Ma nouvelle adresse est 78, boulevard Caroline Dupuis, 44812 De Sousa-sur-Mer.",
            "78, boulevard Caroline Dupuis, 44812 De Sousa-sur-Mer",
        ),
        (
            "{\"address\": \"Plaza Obdulia Cerdá 72 Apt. 67 , Ciudad, 44272\", \"note\": \"urgent\"}",
            "Plaza Obdulia Cerdá 72 Apt. 67 , Ciudad, 44272",
        ),
    ] {
        assert_finds(&d, text, "address", address);
    }
}

/// A Latin name set in Chinese, Japanese, Korean or Thai text touches the
/// words around it (no spaces there): it is found, and only the name.
#[test]
fn a_latin_name_in_text_without_spaces_is_found() {
    let d = model_detector();
    for (text, name) in [
        ("请联系Jane Doe明天。", "Jane Doe"),
        ("Maria Garciaさんに電話してください。", "Maria Garcia"),
        ("明日 Maria Garcia さんに電話してください。", "Maria Garcia"),
        ("Maria Garcia씨에게 전화하세요.", "Maria Garcia"),
        ("โทรหาJohn Smithพรุ่งนี้", "John Smith"),
    ] {
        assert_finds(&d, text, "person", name);
    }
}

/// A possessive ending is the sentence's, not the name's: a person written
/// with it and without it is one person, with one placeholder, and the
/// ending stays for the cloud model to read.
#[test]
fn a_name_with_a_possessive_is_the_same_person() {
    let d = model_detector();
    for (text, name) in [
        ("Kevin's phone number changed.", "Kevin"),
        ("I borrowed Anna Smith's car yesterday.", "Anna Smith"),
        (
            "Please forward this to Chris Jones' assistant.",
            "Chris Jones",
        ),
    ] {
        assert_finds(&d, text, "person", name);
    }
    assert_redacts(
        &d,
        "Maria Garcia called twice. Maria Garcia's new number is on file.",
        "[PERSON_1] called twice. [PERSON_1]'s new number is on file.",
    );
}

/// People named in a list are as many people: each gets a placeholder of
/// their own, and the cloud model can tell them apart.
#[test]
fn people_in_a_list_each_get_a_placeholder() {
    let d = model_detector();
    assert_redacts(
        &d,
        "The attendees were Tom, Lisa and Raj. Invite Jane Doe, John Smith and Ana Ruiz too.",
        "The attendees were [PERSON_1], [PERSON_2] and [PERSON_3]. \
         Invite [PERSON_4], [PERSON_5] and [PERSON_6] too.",
    );
}

/// The model reads text without case and takes the verb after a name for
/// a surname ("Raj collapsed" 1.00): a placeholder over both would hide
/// what happened from the cloud, and the answer would call him "Raj
/// collapsed". A capitalised name ends at its last capitalised word. It
/// takes the verb opening its sentence for a given name too ("Pay Yosef"
/// 0.82, "Meet" 0.55): a name does not start with one.
#[test]
fn a_name_takes_neither_the_verb_after_it_nor_the_one_before() {
    let d = model_detector();
    for (text, name) in [
        ("My husband Raj collapsed at work.", "Raj"),
        ("my son Hannah vomited twice tonight", "Hannah"),
        ("my friend Pedro cried all night", "Pedro"),
        ("my daughter Nina coughs a lot at night", "Nina"),
        ("My neighbour Maria Garcia died last week.", "Maria Garcia"),
        ("Pay Yosef for the tutoring session.", "Yosef"),
        ("pay ahmed for the tutoring session.", "ahmed"),
        ("Meet Mei at the station at six.", "Mei"),
    ] {
        assert_finds(&d, text, "person", name);
        let found = d.find(text).unwrap();
        assert_eq!(found.len(), 1, "{text}: {found:?}");
    }
    assert_redacts(
        &d,
        "My husband Raj collapsed at work.",
        "My husband [PERSON_1] collapsed at work.",
    );
    assert_redacts(
        &d,
        "Meet Mei at the station at six.",
        "Meet [PERSON_1] at the station at six.",
    );
}

/// The model may be sure of a surname and read the given name before it as
/// nothing when a capitalised word comes before that ("Phone Sarah Cohen"
/// gives "Cohen" only): a placeholder on the surname alone would send the
/// given name to the cloud. The word before the surname is read where a
/// name is asked for, and taken where it is near-certainly a given name;
/// an imperative opening the sentence is not ("Let Porter know…" reads
/// there as a given name too), nor a word before a given name. A name
/// written surname first ("Chen Wei") is found whole too.
#[test]
fn a_given_name_is_not_left_out_before_its_surname() {
    let d = model_detector();
    for (text, name) in [
        ("Phone Sarah Cohen after lunch.", "Sarah Cohen"),
        ("Warn Sarah Cohen about the outage.", "Sarah Cohen"),
        ("Send Sam Porter the photos.", "Sam Porter"),
        ("Yesterday Sam Porter sent the files.", "Sam Porter"),
        // Written surname first: read alone, "Chen" is a surname.
        ("Phone Chen Wei after lunch.", "Chen Wei"),
    ] {
        assert_finds(&d, text, "person", name);
    }
    for (text, name) in [
        ("Thanks. Let Ama know it shipped.", "Ama"),
        ("Happy Sarah Cohen, the report is ready.", "Sarah Cohen"),
    ] {
        assert_finds(&d, text, "person", name);
        let found = d.find(text).unwrap();
        assert_eq!(found.len(), 1, "{text}: {found:?}");
    }
    assert_redacts(
        &d,
        "Phone Sarah Cohen after lunch.",
        "Phone [PERSON_1] after lunch.",
    );
}

/// A lone name after a verb that takes a person ("Tell Bob…", "…and text
/// Anna when…", "call bob…" in chat written in lower case) the model often
/// reads as nothing; read again as a request ("Please tell Bob…", or
/// "Please tell Kwame." where a second object follows it) and alone, names
/// are found, while tools, teams and products in the same place (which the
/// request reading may take for names) are not.
#[test]
fn a_lone_name_after_a_verb_is_found() {
    let d = model_detector();
    for (text, name) in [
        ("Tell Bob I will be late.", "Bob"),
        ("Give Bob a call.", "Bob"),
        ("Text Anna when you arrive.", "Anna"),
        ("Email Mia the slides.", "Mia"),
        ("Call Dan tomorrow.", "Dan"),
        ("Thanks. Tell Sue I will be late.", "Sue"),
        ("Give Mia a call and text Anna when you land.", "Anna"),
        // Chat written in lower case, and without a full stop.
        ("call bob tomorrow morning", "bob"),
        ("give bob a call later", "bob"),
        ("hey can you email jack the slides", "jack"),
        ("Call Dan tomorrow morning", "Dan"),
        // A second object after the name, or a verb read as a noun.
        ("Email Kwame the slides before noon.", "Kwame"),
        ("Forward Ingrid my CV please.", "Ingrid"),
        ("Text Mei the address of the venue.", "Mei"),
        // Verbs that take a person among other things.
        ("Keep Okafor in the loop.", "Okafor"),
        ("Loop Priya in on this.", "Priya"),
        ("Make Ama the owner of the repo.", "Ama"),
        ("Book Khan a table for two.", "Khan"),
        ("keep porter in the loop", "porter"),
    ] {
        assert_finds(&d, text, "person", name);
    }
    for text in [
        "Tell Git to ignore the build folder.",
        "Show Chrome the certificate.",
        "Email Stripe about the payout.",
        "Add Helm to the project.",
        "Show Tokio the new config.",
        "Contact Support if it fails.",
        "Call Mom when you land.",
        "send feedback to the team",
        "call support if it fails again",
        "text messages keep failing to send",
        "pay rent on time every month",
        "tell me a joke",
        // Words that are names too, written in lower case as things.
        "pay bill online before friday",
        "call june the best month for travel",
        "add basil before serving",
        // The same verbs with a thing after them.
        "Make Terraform use less memory.",
        "Keep Grafana warm between requests.",
        "Take Docker offline tonight.",
        "Loop React into the review flow.",
        "make sure the tests pass",
        "have a look at this error",
        "take care of the deploy",
        // Chat ending a request with a word the model reads as a name.
        "let me know when done",
        "call me when done",
        "send me the link when done",
    ] {
        let found = d.find(text).unwrap();
        assert!(found.is_empty(), "{text}: {found:?}");
    }
    assert_redacts(
        &d,
        "Tell Bob I will be late. Give Mia a call and text Anna when you land.",
        "Tell [PERSON_1] I will be late. Give [PERSON_2] a call and text [PERSON_3] when you land.",
    );
    assert_redacts(
        &d,
        "call bob tomorrow morning",
        "call [PERSON_1] tomorrow morning",
    );
    assert_redacts(
        &d,
        "Email Kwame the slides before noon.",
        "Email [PERSON_1] the slides before noon.",
    );
}
