//! The pattern recognizers on realistic text, and what they must leave alone.

use super::*;
use tandem_api::{GenerateRequest, Input, Message, Sampling};

fn classes(d: &Detector, text: &str) -> Vec<String> {
    d.find(text).unwrap().into_iter().map(|f| f.class).collect()
}

fn found(d: &Detector, text: &str) -> Vec<(String, String)> {
    d.find(text)
        .unwrap()
        .into_iter()
        .map(|f| (f.class, text[f.start..f.end].to_owned()))
        .collect()
}

fn detector() -> Detector {
    Detector::new(&[CustomPattern {
        name: "employee_id".into(),
        regex: r"\bEMP-\d{6}\b".into(),
    }])
    .unwrap()
}

#[test]
fn finds_each_class() {
    let d = detector();
    let cases = [
        (
            "mail me at jane.doe@example.co.uk today",
            "email",
            "jane.doe@example.co.uk",
        ),
        (
            "call +44 20 7946 0958 tomorrow",
            "phone",
            "+44 20 7946 0958",
        ),
        ("call (555) 123-4567", "phone", "(555) 123-4567"),
        ("Tel.: 030 12345678", "phone", "030 12345678"),
        ("mon portable: 06 12 34 56 78", "phone", "06 12 34 56 78"),
        ("phone 98765 43210", "phone", "98765 43210"),
        (
            "card 4111 1111 1111 1111 exp 12/29",
            "card_number",
            "4111 1111 1111 1111",
        ),
        // A group of digits glued before the card: the first candidate
        // swallows the card's start, so the search resumes inside it.
        (
            "345345 5500 0000 0000 0004 ",
            "card_number",
            "5500 0000 0000 0004",
        ),
        (
            "٣٤٥٣٤٥ 5500 0000 0000 0004",
            "card_number",
            "5500 0000 0000 0004",
        ),
        (
            "IBAN DE89 3704 0044 0532 0130 00 please",
            "iban",
            "DE89 3704 0044 0532 0130 00",
        ),
        ("GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
        (
            "iban de89 3704 0044 0532 0130 00 thanks",
            "iban",
            "de89 3704 0044 0532 0130 00",
        ),
        (
            "IBAN: DE89-3704-0044-0532-0130-00.",
            "iban",
            "DE89-3704-0044-0532-0130-00",
        ),
        ("gb82west12345698765432", "iban", "gb82west12345698765432"),
        // One character short of the registry's length (as Faker's en_IN
        // writes them), grouped in fours: still an IBAN by its checksum.
        (
            "Refund to account GB17-KXJN-4259-0906-0464-8.",
            "iban",
            "GB17-KXJN-4259-0906-0464-8",
        ),
        ("SSN 123-45-6789", "national_id", "123-45-6789"),
        ("NINO AB 12 34 56 C", "national_id", "AB 12 34 56 C"),
        ("DNI 12345678Z", "national_id", "12345678Z"),
        ("PESEL 44051401359", "national_id", "44051401359"),
        (
            "Codice fiscale RSSMRA85T10A562S",
            "national_id",
            "RSSMRA85T10A562S",
        ),
        (
            "server at 192.168.1.20 is down",
            "ip_address",
            "192.168.1.20",
        ),
        ("GET /?ip=192.168.1.20&x=1", "ip_address", "192.168.1.20"),
        (
            "remote_addr=10.20.30.40 denied",
            "ip_address",
            "10.20.30.40",
        ),
        ("clientIP=172.16.4.9", "ip_address", "172.16.4.9"),
        ("host=203.0.113.7 port=22", "ip_address", "203.0.113.7"),
        (
            "Call me at 830-739-1019x6949 after six.",
            "phone",
            "830-739-1019x6949",
        ),
        (
            "Phone: +1-416-972-2961 ext. 60019",
            "phone",
            "+1-416-972-2961 ext. 60019",
        ),
        (
            "v6 2001:db8:85a3::8a2e:370:7334 too",
            "ip_address",
            "2001:db8:85a3::8a2e:370:7334",
        ),
        (
            "key sk-proj-abcdefghijklmnopqrstuvwxyz123456",
            "secret",
            "sk-proj-abcdefghijklmnopqrstuvwxyz123456",
        ),
        ("AWS AKIAIOSFODNN7EXAMPLE", "secret", "AKIAIOSFODNN7EXAMPLE"),
        (
            "My AWS secret key is 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, why?",
            "secret",
            "+1ue/3eb68KEwTznt6/lW6gLpqfMau4BVxUPzLnX",
        ),
        (
            "/w6QUCH3ZNDbMm5DIr5DVSFuCSq9ukVQFhkG9Zkk is my AWS secret",
            "secret",
            "/w6QUCH3ZNDbMm5DIr5DVSFuCSq9ukVQFhkG9Zkk",
        ),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "secret",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        // One key in about a thousand has no digit.
        (
            "export AWS_SECRET_ACCESS_KEY=pqLQBeBLpWfprUsVnUfezlXxKPbxUGvae+fGiobr",
            "secret",
            "pqLQBeBLpWfprUsVnUfezlXxKPbxUGvae+fGiobr",
        ),
        ("password = hunter2hunter2", "secret", "hunter2hunter2"),
        (
            "db: postgres://app:s3cr3tPass@db.internal/prod",
            "secret",
            "s3cr3tPass",
        ),
        (
            "I was born on 12.03.1985 in Berlin",
            "date_of_birth",
            "12.03.1985",
        ),
        (
            "Date of birth: March 4, 1990",
            "date_of_birth",
            "March 4, 1990",
        ),
        ("geboren am 3. Mai 1979", "date_of_birth", "3. Mai 1979"),
        ("née le 14 juillet 1982", "date_of_birth", "14 juillet 1982"),
        (
            "fecha de nacimiento: 5 de mayo de 1970",
            "date_of_birth",
            "5 de mayo de 1970",
        ),
        ("my passport number is 533380006", "passport", "533380006"),
        ("Reisepass C01X00T47", "passport", "C01X00T47"),
        (
            "Urodziłem się 17 March 1963.",
            "date_of_birth",
            "17 March 1963",
        ),
        (
            "You can reach the office on 2035328509.",
            "phone",
            "2035328509",
        ),
        ("Appelez-moi au 02 34 88 66 35.", "phone", "02 34 88 66 35"),
        (
            r#"{"passport_number": "R98575830"}"#,
            "passport",
            "R98575830",
        ),
        (
            "Meine Reisepassnummer ist 634641614.",
            "passport",
            "634641614",
        ),
        ("MRN: 00123456", "medical_record", "00123456"),
        ("patient ID MR-4421907", "medical_record", "MR-4421907"),
        ("badge EMP-004211", "employee_id", "EMP-004211"),
        ("My name is Hans Müller.", "person", "Hans Müller"),
        ("Dear Dr. Priya Sharma,", "person", "Dr. Priya Sharma"),
        (
            "Napisz wiadomość do pan Adam Wyskiel.",
            "person",
            "pan Adam Wyskiel",
        ),
        (
            "Wczoraj rozmawiałem z pani Julianna Zaucha o fakturze.",
            "person",
            "pani Julianna Zaucha",
        ),
        (
            "Merci à madame Claire Petit.",
            "person",
            "madame Claire Petit",
        ),
        (
            "Bitte an Herrn Jan Roth senden.",
            "person",
            "Herrn Jan Roth",
        ),
        (
            "ship to 1600 Pennsylvania Avenue",
            "address",
            "1600 Pennsylvania Avenue",
        ),
        ("wohne in der Hauptstraße 5", "address", "Hauptstraße 5"),
        ("London SW1A 1AA", "address", "SW1A 1AA"),
        (
            "{\"address\": \"Unit 9341 Box 8445, DPO AE 53621\"}",
            "address",
            "Unit 9341 Box 8445, DPO AE 53621",
        ),
        (
            "Ship it to PSC 802 Box 74, APO AE 09499-0074 please",
            "address",
            "PSC 802 Box 74, APO AE 09499-0074",
        ),
        (
            "mail: USNS Comfort FPO AA 34058.",
            "address",
            "USNS Comfort FPO AA 34058",
        ),
    ];
    for (text, class, value) in cases {
        let got = found(&d, text);
        assert!(
            got.iter().any(|(c, v)| c == class && v == value),
            "{text}: want {class} `{value}`, got {got:?}"
        );
    }
}

#[test]
fn code_numbers_and_dates_are_left_alone() {
    let d = detector();
    for text in [
        "order 4111 1111 1111 1112 shipped",
        "Your order 4454 9115 1411 1112 has shipped.",
        "Order no. 4454 9115 1411 1112: two items",
        "Booking reference: 4111 1111 1111 1111",
        "Heat the oil in a pan. Then add the garlic.",
        "version 1.2.3 released",
        "upgrade to v10.2.0.1 today",
        "Upgrade to version 10.2.0.1 fixed the crash; 10.1.4.7 still has it.",
        "Your order 6163 1116 1131 1118 has shipped; tracking number 5882 1000 0000 0062 1100 20.",
        "Your order 6116 1141 1111 1112 has shipped; tracking number 9400 1200 0000 0800 0000 00.",
        "pip install torch==2.3.1.0",
        "conda install numpy=1.26.4.0",
        "request de12f3a4-5b6c-7d8e-9f01-23456789abcd failed",
        "commit ab12cd34ef56ab78cd90ef12ab34cd56ef78ab90",
        "set version=10.2.0.1 and build=4.1.0.7",
        "the year 2024 and 1999",
        "SSN-like 000-12-3456",
        "DNI 12345678A",
        "IBAN DE88 3704 0044 0532 0130 00",
        "it costs 12.50 euros",
        "token = tokenizer.encode(text)",
        "password = os.environ[\"DB_PASSWORD\"]",
        "api_key = get_api_key()",
        "secret_key = settings.SECRET_KEY",
        "let token = self.next_token();",
        "the meeting is on 12.03.2025 at 10:30",
        "tracking number 9400 1000 0000 0000 0000 00",
        "Build 20240517.3 finished in 12.5 s",
        "INFO 2024-05-17T10:31:22Z worker=3 latency_ms=1234567",
        "for i in range(1000000): total += i * 31337",
        "matrix = [[1, 2, 3], [4, 5, 6]]",
        "commit 4f2a9c1b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "call me maybe",
        "My name is not important.",
    ] {
        assert!(
            d.find(text).unwrap().is_empty(),
            "{text}: {:?}",
            found(&d, text)
        );
    }
}

#[test]
fn digits_of_any_script_are_found_without_panics() {
    let d = detector();
    assert_eq!(classes(&d, "SSN १२३-४५-६७८९"), vec!["national_id"]);
    assert_eq!(classes(&d, "SSN ١٢٣-٤٥-٦٧٨٩"), vec!["national_id"]);
    assert_eq!(
        classes(&d, "card ４１１１ １１１１ １１１１ １１１１"),
        vec!["card_number"]
    );
    let iban = "IBAN DE٨٩ ٣٧٠٤ ٠٠٤٤ ٠٥٣٢ ٠١٣٠ ٠٠";
    let f = d.find(iban).unwrap();
    assert_eq!(f.len(), 1);
    assert!(iban.is_char_boundary(f[0].start) && iban.is_char_boundary(f[0].end));
    // Mixed scripts and odd characters around every pattern: no panic.
    for text in [
        "１２３４５６７８Z",
        "DE89३७०४००४४०५३२०१३०००",
        "+४४ २० ७९४६ ०९५८",
        "\u{0}\u{feff}12.03.1985 born",
        "passport ＡＢ１２３４５６７",
        "ü-123-45-6789-ü",
    ] {
        let _ = d.find(text).unwrap();
    }
}

#[test]
fn redaction_is_consistent_and_reversible_across_chunks() {
    let d = detector();
    let mut r = Redaction::default();
    let a = r
        .redact(&d, "Email bob@corp.com or bob@corp.com, not amy@corp.com")
        .unwrap();
    assert_eq!(a, "Email [EMAIL_1] or [EMAIL_1], not [EMAIL_2]");
    assert_eq!(r.classes.get("email"), Some(&2));
    let mut rest = r.restorer();
    let mut out = String::new();
    for chunk in [
        "I wrote to [EM",
        "AIL_1] and [",
        "EMAIL_2]. [note] ok",
        " [EMAIL_9] end [",
    ] {
        out.push_str(&rest.push(chunk));
    }
    out.push_str(&rest.finish());
    assert_eq!(
        out,
        "I wrote to bob@corp.com and amy@corp.com. [note] ok [EMAIL_9] end ["
    );
}

fn request() -> GenerateRequest {
    let mut assistant = Message::new("assistant", "");
    assistant.extra.insert(
        "tool_calls".into(),
        serde_json::json!([{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"ssn\": \"123-45-6789\", \"card\": \"4111 1111 1111 1111\"}"}}]),
    );
    let mut user = Message::new("user", "hello");
    user.name = Some("jane.doe@example.com".into());
    user.extra.insert(
        "metadata".into(),
        serde_json::json!({"contact": "amy@corp.com"}),
    );
    let mut tool = Message::new("tool", "{\"phone\": \"+44 20 7946 0958\"}");
    tool.extra.insert("tool_call_id".into(), "c1".into());
    let mut extra = serde_json::Map::new();
    extra.insert("user".into(), "bob@corp.com".into());
    extra.insert(
        "metadata".into(),
        serde_json::json!({"owner@corp.com": "key holder"}),
    );
    GenerateRequest {
        choices: 1,
        model: "m".into(),
        input: Input::Chat {
            messages: vec![user, assistant, tool],
            continue_from: None,
        },
        sampling: Sampling::default(),
        max_tokens: None,
        stop: vec![],
        logprobs: None,
        stream: false,
        include_usage: false,
        extra,
    }
}

#[test]
fn every_field_a_request_carries_is_scanned_and_redacted() {
    let d = detector();
    let mut req = request();
    let scan = scan_request(&d, &req).unwrap();
    assert_eq!(scan.classes.get("email"), Some(&4), "{scan:?}");
    assert_eq!(scan.classes.get("national_id"), Some(&1));
    assert_eq!(scan.classes.get("card_number"), Some(&1));
    assert_eq!(scan.classes.get("phone"), Some(&1));
    let mut r = Redaction::default();
    redact_request(&d, &mut req, &mut r).unwrap();
    let sent = serde_json::to_string(&req.to_chat_request("m")).unwrap();
    for secret in [
        "jane.doe",
        "amy@corp",
        "123-45-6789",
        "4111 1111",
        "7946",
        "bob@corp",
        "owner@corp",
    ] {
        assert!(!sent.contains(secret), "{secret} left in {sent}");
    }
    assert!(scan_request(&d, &req).unwrap().is_empty());
}

#[test]
fn content_parts_are_scanned_and_redacted_but_payloads_are_not_text() {
    let d = detector();
    let mut req = request();
    let parts: Vec<tandem_api::openai::ContentPart> = serde_json::from_value(serde_json::json!([
        {"type": "text", "text": "Mail amy@corp.com about "},
        {"type": "image_url", "image_url": {"url": "https://img.example/bob@corp.com.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AKIAIOSFODNN7EXAMPLE+amy@corp.com"}},
        {"type": "input_audio", "input_audio": {"data": "amy@corp.com", "format": "wav"}},
        {"type": "text", "text": "this."},
    ]))
    .unwrap();
    let Input::Chat { messages, .. } = &mut req.input else {
        panic!()
    };
    messages[0].content = "Mail amy@corp.com about this.".into();
    messages[0].parts = Some(parts);
    let scan = scan_request(&d, &req).unwrap();
    // The text part's email, the URL's; not the payloads (nor `content`
    // again: it is the text parts).
    assert_eq!(scan.classes.get("email"), Some(&6), "{scan:?}");
    assert_eq!(scan.classes.get("image"), Some(&2));
    assert_eq!(scan.classes.get("audio"), Some(&1));
    assert!(!scan.classes.contains_key("secret"), "{scan:?}");
    let mut r = Redaction::default();
    redact_request(&d, &mut req, &mut r).unwrap();
    let Input::Chat { messages, .. } = &req.input else {
        panic!()
    };
    let sent = serde_json::to_value(req.to_chat_request("m")).unwrap();
    let parts = &sent["messages"][0]["content"];
    assert!(
        !parts[0]["text"].as_str().unwrap().contains("amy@"),
        "{parts}"
    );
    assert!(
        !parts[1]["image_url"]["url"]
            .as_str()
            .unwrap()
            .contains("bob@")
    );
    assert_eq!(
        parts[2]["image_url"]["url"],
        "data:image/png;base64,AKIAIOSFODNN7EXAMPLE+amy@corp.com"
    );
    assert_eq!(parts[3]["input_audio"]["data"], "amy@corp.com");
    // What a local model would read is the redacted text parts.
    assert_eq!(
        messages[0].content,
        format!(
            "{}{}",
            parts[0]["text"].as_str().unwrap(),
            parts[4]["text"].as_str().unwrap()
        )
    );
}

struct Failing;

impl EntityRecognizer for Failing {
    fn recognize(&self, _: &str) -> Result<Vec<Entity>, String> {
        Err("model crashed".into())
    }
}

struct Names;

impl EntityRecognizer for Names {
    fn recognize(&self, text: &str) -> Result<Vec<Entity>, String> {
        Ok(text
            .match_indices("Anna")
            .map(|(i, m)| Entity {
                label: "GIVEN_NAME".into(),
                start: i,
                end: i + m.len(),
                score: 0.9,
            })
            .collect())
    }
}

#[test]
fn a_detector_that_cannot_run_says_so_instead_of_finding_nothing() {
    let d = detector().with_recognizer(Arc::new(Failing));
    assert!(d.find("hello").is_err());
    let d = detector().without_recognizer("the model file is missing");
    assert_eq!(
        d.find("hello").unwrap_err(),
        Unavailable("the model file is missing".into())
    );
    let d = detector().with_recognizer(Arc::new(Names));
    assert_eq!(classes(&d, "ask Anna"), vec!["person"]);
}

#[test]
fn an_allowed_text_is_never_reported_and_nothing_else_changes() {
    let d = detector()
        .with_recognizer(Arc::new(Names))
        .with_allow_list(&[" anna ".into(), "Support@Example.com".into(), "  ".into()]);
    // Whole findings only, in any case; a name around it, or another
    // address, is still found.
    assert_eq!(classes(&d, "ask Anna"), Vec::<String>::new());
    assert_eq!(
        classes(&d, "mail support@example.com"),
        Vec::<String>::new()
    );
    assert_eq!(
        found(&d, "mail sales@example.com or Anna Smith, EMP-123456"),
        vec![
            ("email".to_owned(), "sales@example.com".to_owned()),
            ("person".to_owned(), "Anna Smith".to_owned()),
            ("employee_id".to_owned(), "EMP-123456".to_owned()),
        ]
    );
    assert_eq!(
        classes(&detector(), "mail support@example.com"),
        vec!["email"]
    );
}

#[test]
fn overlapping_readings_of_one_address_are_their_union() {
    let t = "Ship to 72204 Kristine Vista Suite 569, West Philliptown, AS 99292 today.";
    let hit = |class: &str, part: &str, priority: u8| {
        let start = t.find(part).unwrap_or(0);
        patterns::Hit {
            class: class.into(),
            start,
            end: start + part.len(),
            priority,
        }
    };
    let got = |hits| -> Vec<(String, String)> {
        resolve(t, hits)
            .into_iter()
            .map(|f| (f.class, t[f.start..f.end].to_owned()))
            .collect()
    };
    assert_eq!(
        got(vec![
            hit(
                "address",
                "72204 Kristine Vista Suite 569, West Philliptown, AS",
                1
            ),
            hit("address", "569, West Philliptown, AS 99292", 1),
        ]),
        [(
            "address".to_owned(),
            "72204 Kristine Vista Suite 569, West Philliptown, AS 99292".to_owned()
        )]
    );
    // A reading that overlaps another class's finding is left out, as
    // before; no union takes that finding in.
    assert_eq!(
        got(vec![
            hit("address", "72204 Kristine Vista Suite 569", 1),
            hit("address", "569, West Philliptown, AS 99292", 1),
            hit("phone", "AS 99292 today", 2),
        ]),
        [
            (
                "address".to_owned(),
                "72204 Kristine Vista Suite 569".to_owned()
            ),
            ("phone".to_owned(), "AS 99292 today".to_owned()),
        ]
    );
}

#[test]
fn a_number_beside_other_groups_is_still_found() {
    // The patterns run on greedily into the groups around a number; the
    // number in the run must still be found, and only it.
    let d = detector();
    let iban = "DE89 3704 0044 0532 0130 00";
    let card = "4111 1111 1111 1111";
    for (text, class, value) in [
        (
            "IBAN: DE89 3704 0044 0532 0130 00 BIC: COBADEFFXXX",
            "iban",
            iban,
        ),
        ("pay DE89 3704 0044 0532 0130 00 IN FULL", "iban", iban),
        ("DE89 3704 0044 0532 0130 00 A", "iban", iban),
        (
            "IBAN DE89370400440532013000 BIC COBADEFFXXX",
            "iban",
            "DE89370400440532013000",
        ),
        ("card 4111 1111 1111 1111 12/27", "card_number", card),
        ("card 4111 1111 1111 1111 123 cvv", "card_number", card),
        ("visa 4111 1111 1111 1111 2 times", "card_number", card),
        ("room 12 4111 1111 1111 1111", "card_number", card),
        (
            "card 4111-1111-1111-1111 0",
            "card_number",
            "4111-1111-1111-1111",
        ),
    ] {
        assert_eq!(
            found(&d, text),
            [(class.to_owned(), value.to_owned())],
            "{text}"
        );
    }
    // Groups that only pass with the next group glued on stay unfound, and
    // a shipment's number is still not a card.
    assert!(classes(&d, "tracking 4111 1111 1111 1111 12").is_empty());
    assert!(classes(&d, "DE89 3704 0044 0532 0130 0").is_empty());
}

#[test]
fn a_value_after_a_labels_colon_is_found() {
    // Forms, logs and URIs write `key:value` with no space.
    let d = detector();
    for (text, class, value) in [
        ("SSN:123-45-6789", "national_id", "123-45-6789"),
        (
            "card:4111 1111 1111 1111",
            "card_number",
            "4111 1111 1111 1111",
        ),
        ("card:4111111111111111", "card_number", "4111111111111111"),
        // An order beside a card, not naming it.
        (
            "I paid the order with 4111 1111 1111 1111.",
            "card_number",
            "4111 1111 1111 1111",
        ),
        (
            "Order: charge 4111 1111 1111 1111",
            "card_number",
            "4111 1111 1111 1111",
        ),
        ("GET /login?ip=192.168.1.20", "ip_address", "192.168.1.20"),
        ("tel:+44 20 7946 0958", "phone", "+44 20 7946 0958"),
        ("phone:(555) 123-4567", "phone", "(555) 123-4567"),
    ] {
        assert_eq!(
            found(&d, text),
            [(class.to_owned(), value.to_owned())],
            "{text}"
        );
    }
    // A version or an identifier before the colon is still glue.
    assert!(classes(&d, "v1.2:4111111111111111").is_empty());
    assert!(classes(&d, "build-7:123-45-6789").is_empty());
}

#[test]
fn a_placeholder_the_request_already_spells_is_never_handed_out() {
    // The user writes "[EMAIL_1]" in a later message (a template's slot, a
    // quoted answer); the address in an earlier one must get another
    // placeholder, or the answer's echo of the literal would come back as
    // the address.
    let d = detector();
    let mut req = request();
    if let Input::Chat { messages, .. } = &mut req.input {
        messages.push(Message::new(
            "user",
            "Fill [EMAIL_1] and [EMAIL_2] in, and [PHONE_1], [note], [EMAIL_X].",
        ));
    }
    let mut r = Redaction::default();
    redact_request(&d, &mut req, &mut r).unwrap();
    let sent = serde_json::to_string(&req.to_chat_request("m")).unwrap();
    for taken in ["[EMAIL_1]", "[EMAIL_2]", "[PHONE_1]"] {
        assert_eq!(sent.matches(taken).count(), 1, "{taken} handed out: {sent}");
    }
    assert!(
        sent.contains("[EMAIL_3]") && sent.contains("[PHONE_2]"),
        "{sent}"
    );
    let mut back = r.restorer();
    let mut out = back.push("Filled [EMAIL_1], [EMAIL_3] and [PHONE_2] for [EMAIL_2].");
    out.push_str(&back.finish());
    assert_eq!(
        out,
        "Filled [EMAIL_1], jane.doe@example.com and +44 20 7946 0958 for [EMAIL_2]."
    );
}

#[test]
fn numbers_written_with_unicode_separators_or_url_encoded_are_found() {
    // Copied from a web page or a word processor, or French typography:
    // no-break and thin spaces between groups, non-breaking hyphens and en
    // dashes; an address in a URL's query string.
    let d = detector();
    for (text, class, value) in [
        (
            "card 4111\u{a0}1111\u{a0}1111\u{a0}1111",
            "card_number",
            "4111\u{a0}1111\u{a0}1111\u{a0}1111",
        ),
        (
            "card 4111\u{2009}1111\u{2009}1111\u{2009}1111",
            "card_number",
            "4111\u{2009}1111\u{2009}1111\u{2009}1111",
        ),
        (
            "card 4111\u{2011}1111\u{2011}1111\u{2011}1111",
            "card_number",
            "4111\u{2011}1111\u{2011}1111\u{2011}1111",
        ),
        (
            "call +44\u{a0}20\u{a0}7946\u{a0}0958",
            "phone",
            "+44\u{a0}20\u{a0}7946\u{a0}0958",
        ),
        (
            "mon portable : 06\u{202f}12\u{202f}34\u{202f}56\u{202f}78",
            "phone",
            "06\u{202f}12\u{202f}34\u{202f}56\u{202f}78",
        ),
        (
            "SSN 123\u{2013}45\u{2013}6789",
            "national_id",
            "123\u{2013}45\u{2013}6789",
        ),
        (
            "IBAN DE89\u{a0}3704\u{a0}0044\u{a0}0532\u{a0}0130\u{a0}00",
            "iban",
            "DE89\u{a0}3704\u{a0}0044\u{a0}0532\u{a0}0130\u{a0}00",
        ),
        (
            "GET /signup?email=jane.doe%40example.com&x=1",
            "email",
            "jane.doe%40example.com",
        ),
    ] {
        assert_eq!(
            found(&d, text),
            [(class.to_owned(), value.to_owned())],
            "{text}"
        );
    }
    // A clause's em dash is not a number's hyphen.
    assert!(classes(&d, "Version 2\u{2014}the 4111\u{2014}release").is_empty());
}

#[test]
fn an_address_written_to_dodge_scrapers_is_found() {
    let d = detector();
    for text in [
        "mail jane.doe(at)example.com",
        "mail jane.doe [at] example [dot] com",
        "Kontakt: h.mueller{AT}firma{DOT}de",
    ] {
        assert_eq!(classes(&d, text), ["email"], "{text}");
    }
    // Code that indexes with a variable named `at` is not an address.
    for text in [
        "let x = buf[at] + offset.len();",
        "items[at].value",
        "look at example dot com",
    ] {
        assert!(classes(&d, text).is_empty(), "{text}");
    }
}

#[test]
fn a_value_split_across_text_parts_is_found_and_replaced_where_it_starts() {
    // An app that cuts a document into parts of a fixed size cuts through
    // whatever straddles the cut.
    let d = detector();
    let mut req = request();
    let parts: Vec<tandem_api::openai::ContentPart> = serde_json::from_value(serde_json::json!([
        {"type": "text", "text": "Write to jane.d"},
        {"type": "text", "text": "oe@example.org and charge 4111 1111 "},
        {"type": "image_url", "image_url": {"url": "https://img.example/cat.png"}},
        {"type": "text", "text": "1111 1111 today."},
    ]))
    .unwrap();
    let Input::Chat { messages, .. } = &mut req.input else {
        panic!()
    };
    messages[0].content =
        "Write to jane.doe@example.org and charge 4111 1111 1111 1111 today.".into();
    messages[0].parts = Some(parts);
    let scan = scan_request(&d, &req).unwrap();
    assert!(scan.classes.contains_key("card_number"), "{scan:?}");
    let mut r = Redaction::default();
    redact_request(&d, &mut req, &mut r).unwrap();
    let sent = serde_json::to_value(req.to_chat_request("m")).unwrap();
    let texts: Vec<&str> = sent["messages"][0]["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(
        texts,
        [
            "Write to [EMAIL_1]",
            " and charge [CARD_NUMBER_1]",
            " today."
        ]
    );
    let mut back = r.restorer();
    let mut out = back.push(&texts.concat());
    out.push_str(&back.finish());
    assert_eq!(
        out,
        "Write to jane.doe@example.org and charge 4111 1111 1111 1111 today."
    );
}
