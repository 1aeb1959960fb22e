"""Regenerates train.jsonl / eval.jsonl: sentences of three software licenses, labelled with the license they come
from (a small real-text classification task: the wording differs, e.g. "the Program", "the Work", "Covered
Software", "the Document").

Source texts: Debian's /usr/share/common-licenses (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3), which the licenses allow to be
copied verbatim. Deterministic (seeded); run `python ftcore/assets/license-sentences/make_license_sentences.py`.
"""

import json
import random
import re
from pathlib import Path

LICENSES = {"gpl-3.0": "GPL-3", "apache-2.0": "Apache-2.0", "mpl-2.0": "MPL-2.0", "gfdl-1.3": "GFDL-1.3"}
SOURCE = Path("/usr/share/common-licenses")
EVAL_SHARE = 0.2


def sentences(text: str) -> list[str]:
    """Sentences and clauses (split at ". ", "; " and ": ") of 30-300 characters, whitespace collapsed, section
    numbers and rulers dropped."""
    flat = re.sub(r"\s+", " ", text)
    out = []
    for piece in re.split(r"(?<=[.;:])\s+", flat):
        piece = re.sub(r"^(\d+(\.\d+)*\.?|\([a-z0-9]+\))\s+", "", piece.strip())  # "3.2." / "(a)" prefixes
        piece = re.sub(r"\s+\d+(\.\d+)*\.$", "", piece)  # a following section's number
        if 30 <= len(piece) <= 300 and not re.fullmatch(r"[\W\d_]+", piece):
            out.append(piece)
    return out


def main() -> None:
    rng = random.Random(0)
    records = []
    for label, name in LICENSES.items():
        seen = set()
        for sentence in sentences((SOURCE / name).read_text()):
            if sentence not in seen:
                seen.add(sentence)
                records.append({"text": sentence, "label": label})
    rng.shuffle(records)
    cut = int(len(records) * EVAL_SHARE)
    here = Path(__file__).parent
    for name, part in (("eval.jsonl", records[:cut]), ("train.jsonl", records[cut:])):
        with open(here / name, "w") as f:
            for record in part:
                f.write(json.dumps(record) + "\n")
    print(f"{len(records) - cut} train, {cut} eval records")


if __name__ == "__main__":
    main()
