"""A labelled set for `tandem bench privacy`: personal data of 18 kinds, made
with Faker in eight locales, placed in natural sentences (in the locale's
language where it has one), in chat turns and in tool-call arguments; and
prompts without personal data that are full of code, logs and numbers.

Each line: {"id", "kind", "locale", "container", "texts": [...], "values":
[[text_index, value, kind], ...]} — `values` are the exact substrings that
must not leave the device. Deterministic for a seed and the pinned Faker.

Usage: python privacy_set.py OUT.jsonl [--seed N] [--per-kind N]
"""

import json
import random
import string
import sys

from faker import Faker

LOCALES = ["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "pl_PL", "en_IN"]

# Sentences per language; {v} is the value.
T = {
    "person": {
        "en": ["Please forward the contract to {v} before Friday.", "I spoke with {v} yesterday about the refund.",
               "Can you write a birthday message for {v}?", "{v} will join the call at 3pm.",
               "Summarise this email from {v}: the shipment is late again.", "Add {v} to the guest list."],
        "de": ["Bitte leite den Vertrag an {v} weiter.", "Ich habe gestern mit {v} über die Rechnung gesprochen.",
               "Schreib eine kurze Nachricht an {v}."],
        "fr": ["Merci de transmettre le dossier à {v}.", "J'ai parlé avec {v} hier soir.", "Écris un message pour {v}."],
        "es": ["Por favor, envía el contrato a {v}.", "Ayer hablé con {v} sobre la factura.", "Escribe un mensaje para {v}."],
        "it": ["Per favore inoltra il contratto a {v}.", "Ieri ho parlato con {v} della fattura.", "Scrivi un messaggio per {v}."],
        "pl": ["Proszę przekazać umowę do {v}.", "Wczoraj rozmawiałem z {v} o fakturze.", "Napisz wiadomość do {v}."],
    },
    "street_address": {
        "en": ["Ship the parcel to {v}.", "My new address is {v}.", "The meeting is at my place, {v}.",
               "Please update my billing address to {v}."],
        "de": ["Meine neue Adresse ist {v}.", "Bitte schick das Paket an {v}."],
        "fr": ["Ma nouvelle adresse est {v}.", "Envoyez le colis au {v}."],
        "es": ["Mi nueva dirección es {v}.", "Envía el paquete a {v}."],
        "it": ["Il mio nuovo indirizzo è {v}.", "Spedisci il pacco a {v}."],
        "pl": ["Mój nowy adres to {v}.", "Wyślij paczkę na adres {v}."],
    },
    "date_of_birth": {
        "en": ["I was born on {v}, what is my zodiac sign?", "Date of birth: {v}.", "DOB {v}, please verify.",
               "My birthday is {v} and I need a new passport."],
        "de": ["Ich bin am {v} geboren.", "Geburtsdatum: {v}."],
        "fr": ["Je suis né le {v}.", "Date de naissance : {v}."],
        "es": ["Nací el {v}.", "Fecha de nacimiento: {v}."],
        "it": ["Sono nato il {v}.", "Data di nascita: {v}."],
        "pl": ["Urodziłem się {v}.", "Data urodzenia: {v}."],
    },
    "passport": {
        "en": ["My passport number is {v}.", "Passport: {v}, expires next year.", "Can you check visa rules for passport {v}?"],
        "de": ["Meine Reisepassnummer ist {v}.", "Reisepass {v} läuft bald ab."],
        "fr": ["Mon numéro de passeport est {v}."],
        "es": ["Mi número de pasaporte es {v}."],
        "it": ["Il mio numero di passaporto è {v}."],
        "pl": ["Mój numer paszportu to {v}."],
    },
    "medical_record": {
        "en": ["Patient MRN {v} needs a follow-up.", "Medical record number: {v}.", "Pull the labs for patient ID {v}.",
               "MRN: {v}, allergy to penicillin."],
        "de": ["Patientennummer {v}, Termin nächste Woche."],
        "fr": ["Numéro de dossier médical {v}."],
    },
    "aws_secret": {
        "en": ["aws_secret_access_key = {v}", "My AWS secret key is {v}, why does S3 deny access?",
               "export AWS_SECRET_ACCESS_KEY={v}", "secret: {v}"],
    },
    "aws_key_id": {
        "en": ["aws_access_key_id = {v}", "The access key {v} was rotated.", "Why is {v} not authorised for DynamoDB?"],
    },
    "phone": {
        "en": ["Call me at {v} after six.", "My number is {v}.", "Phone: {v}", "You can reach the office on {v}.",
               "Text me on {v} when you arrive.", "tel:{v}"],
        "de": ["Ruf mich unter {v} an.", "Meine Telefonnummer ist {v}."],
        "fr": ["Appelez-moi au {v}.", "Mon numéro de téléphone est le {v}."],
        "es": ["Llámame al {v}.", "Mi teléfono es {v}."],
        "it": ["Chiamami al {v}.", "Il mio numero è {v}."],
        "pl": ["Zadzwoń do mnie pod numer {v}.", "Mój numer telefonu to {v}."],
    },
    "credit_card": {
        "en": ["Charge it to my card {v}.", "Card number {v}, expiry 09/28.", "Why was my card {v} declined?",
               "Card {v} 09/28 CVV 123, please update my billing.", "card:{v}"],
        "de": ["Meine Kartennummer ist {v}."],
        "fr": ["Mon numéro de carte est {v}."],
    },
    "email": {
        "en": ["Send the invoice to {v}.", "My email is {v}.", "Reply to {v} with the schedule."],
        "de": ["Meine E-Mail-Adresse ist {v}."],
        "fr": ["Mon adresse e-mail est {v}."],
    },
    "ssn": {
        "en": ["My SSN is {v}.", "Social security number {v}, please file the form.", "SSN: {v}", "SSN:{v}"],
    },
    "iban": {
        "en": ["Please transfer the deposit to {v}.", "My IBAN is {v}.", "Refund to account {v}.",
               "IBAN: {v} BIC: COBADEFFXXX", "Pay {v} IN FULL by Friday."],
        "de": ["Meine IBAN lautet {v}."],
        "fr": ["Mon IBAN est {v}."],
    },
    "ipv4": {
        "en": ["The server at {v} is not responding.", "Block traffic from {v} in the firewall.",
               "My home IP is {v}, can you whitelist it?",
               "GET /login?ip={v}&attempt=3 returned 403", "client_ip={v} status=429 path=/api"],
    },
    "ipv6": {
        "en": ["The host {v} drops packets.", "My IPv6 address is {v}.", "Allow {v} in the security group."],
    },
}

LANG = {"en_US": "en", "en_GB": "en", "en_IN": "en", "de_DE": "de", "fr_FR": "fr", "es_ES": "es", "it_IT": "it",
        "pl_PL": "pl"}

PHONE_LOCALES = {"phone_us": "en_US", "phone_uk": "en_GB", "phone_de": "de_DE", "phone_fr": "fr_FR",
                 "phone_in": "en_IN"}

KINDS = ["person", "street_address", "date_of_birth", "passport", "medical_record", "aws_secret", "phone_us",
         "phone_uk", "phone_de", "phone_fr", "phone_in", "credit_card", "email", "ssn", "iban", "ipv4", "ipv6",
         "aws_key_id"]


def dob(f, rng):
    d = f.date_of_birth(minimum_age=18, maximum_age=90)
    fmt = rng.choice(["%d.%m.%Y", "%d/%m/%Y", "%m/%d/%Y", "%Y-%m-%d", "%B %d, %Y", "%d %B %Y"])
    return d.strftime(fmt)


def value(kind, f, rng):
    if kind == "person":
        return f.name()
    if kind == "street_address":
        return f.address().replace("\n", ", ")
    if kind == "date_of_birth":
        return dob(f, rng)
    if kind == "passport":
        return f.passport_number()
    if kind == "medical_record":
        return rng.choice(["", "MR-", "MRN", "H"]) + "".join(rng.choice(string.digits) for _ in range(rng.choice([6, 7, 8])))
    if kind == "aws_secret":
        return "".join(rng.choice(string.ascii_letters + string.digits + "/+") for _ in range(40))
    if kind == "aws_key_id":
        return "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    if kind.startswith("phone_"):
        n = f.phone_number()
        # Pasted from a web page or set in French typography: no-break spaces.
        if rng.random() < 0.2:
            n = n.replace(" ", rng.choice(["\u00a0", "\u202f"]))
        return n
    if kind == "credit_card":
        n = f.credit_card_number(card_type=rng.choice(["visa16", "mastercard", "amex", "discover"]))
        if rng.random() < 0.5 and len(n) == 16:
            sep = rng.choice([" ", " ", "\u00a0", "\u2009", "-", "\u2011"])
            n = sep.join(n[i:i + 4] for i in range(0, 16, 4))
        return n
    if kind == "email":
        e = f.email()
        # Written to dodge scrapers.
        if rng.random() < 0.1:
            e = e.replace("@", rng.choice(["(at)", " [at] "]))
        return e
    if kind == "ssn":
        return Faker("en_US").ssn()
    if kind == "iban":
        n = f.iban()
        # Typed rather than printed: lower case, or grouped with dashes.
        if rng.random() < 0.1:
            n = n.lower()
        elif rng.random() < 0.1:
            n = "-".join(n[i:i + 4] for i in range(0, len(n), 4))
        return n
    if kind == "ipv4":
        return f.ipv4_public()
    if kind == "ipv6":
        return f.ipv6()
    raise ValueError(kind)


def templates(kind, locale):
    base = "phone" if kind.startswith("phone_") else kind
    by_lang = T[base]
    lang = LANG[locale]
    return by_lang.get(lang) or by_lang["en"]


def positive(i, kind, rng):
    locale = PHONE_LOCALES.get(kind) or rng.choice(LOCALES)
    f = Faker(locale)
    f.seed_instance(rng.randrange(1 << 30))
    v = value(kind, f, rng)
    sentence = rng.choice(templates(kind, locale)).format(v=v)
    container = rng.choice(["sentence", "sentence", "chat", "tool_args"])
    if container == "sentence":
        texts = [sentence]
    elif container == "chat":
        texts = ["You are a helpful assistant.", "Hi, I need some help with my account.",
                 "Of course. What can I do for you?", sentence]
    else:
        field = {"person": "name", "street_address": "address", "date_of_birth": "birth_date",
                 "passport": "passport_number", "medical_record": "mrn", "aws_secret": "secret_access_key",
                 "aws_key_id": "access_key_id", "credit_card": "card_number", "email": "email", "ssn": "ssn",
                 "iban": "iban", "ipv4": "ip", "ipv6": "ip"}.get(kind, "phone")
        texts = [json.dumps({"customer_id": rng.randrange(1000, 9999), field: v, "note": "urgent"}, ensure_ascii=False)]
    return {"id": f"p{i}", "kind": kind, "locale": locale, "container": container, "texts": texts,
            "values": [[len(texts) - 1, v, kind]]}


NEGATIVE = [
    "def encode(text):\n    token = tokenizer.encode(text)\n    return token[:512]",
    "pip install torch==2.3.1 transformers==4.41.2 numpy>=1.26.4",
    "Upgrade to version 10.2.0.1 fixed the crash; 10.1.4.7 still has it.",
    "for i in range(1000000):\n    total += i * 31337 % 65537",
    "SELECT id, amount FROM orders WHERE created_at >= '2024-05-01' AND amount > 1250.00 LIMIT 100;",
    "2024-05-17T10:31:22Z INFO worker=3 job=8841 latency_ms=1234 status=200 path=/v1/chat/completions",
    "Your order 4111 1111 1111 1112 has shipped; tracking number 9400 1000 0000 0000 0000 00.",
    "The meeting moved to 12.03.2025 at 10:30 in room 4.12.",
    "Invoice no. 2024-00417: 3 x 249.99 EUR, VAT 19%, total 892.46 EUR.",
    "const API_URL = process.env.API_URL; const timeout = 30_000;",
    "password = os.environ['DB_PASSWORD']",
    "api_key = get_api_key(); secret_key = settings.SECRET_KEY",
    "let token = self.next_token()?; let secret = config.secret.clone();",
    "commit 4f2a9c1b8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a Merge branch 'release/2.4.1'",
    "uuid: 123e4567-e89b-12d3-a456-426614174000, trace_id: 5b8aa5a2d2c872e8321cf37308d69df2",
    # Word problems without a person's name: a first name alone is personal
    # data to Tandem (and to this set's positives).
    "A shop sold clips to 48 customers in April, and then it sold half as many clips in May.",
    "A rectangle has a perimeter of 56 cm and its length is three times its width. What is its area?",
    "The ISBN 978-3-16-148410-0 and the SKU 4006381333931 refer to the same book.",
    "Coordinates 48.8566, 2.3522 and an elevation of 35 m.",
    "docker run -p 8080:8080 -e WORKERS=4 ghcr.io/acme/app:1.7.3",
    "npm install react@18.3.1 vite@5.2.11 --save-dev",
    "The build took 12.5 s and produced 3 artifacts of 1.2 MB, 845 KB and 17 KB.",
    "kubectl scale deployment web --replicas=12 -n production",
    "Explain the difference between TCP and UDP with examples.",
    "Write a haiku about autumn leaves falling on a quiet river.",
    "What is the time complexity of quicksort in the worst case, and why?",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarise the causes of the First World War in three sentences.",
    "matrix = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]; print(np.linalg.det(matrix))",
    "CREATE INDEX idx_orders_customer ON orders (customer_id, created_at DESC);",
    "Error 503 at 23:59:58, retrying in 2.5 s (attempt 3 of 5).",
    "The temperature rose from 12.4 to 18.9 degrees between 06:00 and 14:00.",
    "Set max_tokens=256, temperature=0.7, top_p=0.95 and seed=1234 for reproducible runs.",
    "Our Q3 revenue was 4.2 million with a margin of 23.5%, up from 19.8% in Q2.",
    "ffmpeg -i input.mp4 -vf scale=1280:720 -b:v 2500k output.mp4",
    "The package weighs 2.35 kg and measures 40 x 30 x 15 cm.",
    "regex = r'^\\d{3}-\\d{2}-\\d{4}$'  # matches the format, not real data",
    "BEGIN; UPDATE accounts SET balance = balance - 100 WHERE id = 42; COMMIT;",
    "git rebase -i HEAD~5 && git push --force-with-lease origin feature/login",
    "Flight LH 2412 departs at 07:45 from gate B42 and arrives at 09:20.",
]


def negative(i, rng):
    base = rng.choice(NEGATIVE)
    # Vary the numbers so that the set is not the same few prompts.
    out = []
    for ch in base:
        if ch.isdigit() and rng.random() < 0.3:
            out.append(rng.choice(string.digits))
        else:
            out.append(ch)
    text = "".join(out)
    return {"id": f"n{i}", "kind": "none", "locale": "-", "container": "sentence", "texts": [text], "values": []}


def main():
    out = sys.argv[1]
    seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 11
    per_kind = int(sys.argv[sys.argv.index("--per-kind") + 1]) if "--per-kind" in sys.argv else 40
    negatives = int(sys.argv[sys.argv.index("--negatives") + 1]) if "--negatives" in sys.argv else 300
    rng = random.Random(seed)
    Faker.seed(seed)
    rows = []
    i = 0
    for kind in KINDS:
        for _ in range(per_kind):
            rows.append(positive(i, kind, rng))
            i += 1
    for j in range(negatives):
        rows.append(negative(j, rng))
    with open(out, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
