"""Writes data/seq2seq-dates/: dates written in one of six human formats (source) to ISO 8601
(target), e.g. {"source": "3 Mar 1997", "target": "1997-03-03"}. Seeded, deterministic.

    python3 scripts/make_seq2seq_task.py

train.jsonl: 6000 pairs; test.jsonl: 500 pairs over dates that never occur in training (in any
format), so exact match on the test set measures generalisation, not recall.
"""
import datetime
import json
import pathlib
import random

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "data/seq2seq-dates"
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def render(d: datetime.date, fmt: int) -> str:
    m = MONTHS[d.month - 1]
    return [
        f"{d.day} {m} {d.year}",                 # 3 March 1997
        f"{m} {d.day}, {d.year}",                # March 3, 1997
        f"{d.day} {m[:3]} {d.year}",             # 3 Mar 1997
        f"{d.month}/{d.day}/{d.year}",           # 3/3/1997 (US: month first)
        f"{d.day:02d}.{d.month:02d}.{d.year}",   # 03.03.1997
        f"{m[:3].upper()} {d.day:02d} {d.year}",  # MAR 03 1997
    ][fmt]


def main():
    rng = random.Random(7)
    start, span = datetime.date(1950, 1, 1), (datetime.date(2049, 12, 31) - datetime.date(1950, 1, 1)).days
    days = rng.sample(range(span + 1), 6500)
    train_days, test_days = days[:6000], days[6000:]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, ds in [("train", train_days), ("test", test_days)]:
        with open(OUT / f"{name}.jsonl", "w") as f:
            for k in ds:
                d = start + datetime.timedelta(days=k)
                f.write(json.dumps({"source": render(d, rng.randrange(6)), "target": d.isoformat()}) + "\n")
    print(f"wrote {OUT}/train.jsonl ({len(train_days)}) and test.jsonl ({len(test_days)})")


if __name__ == "__main__":
    main()
