"""Small Parquet SFT files (pyarrow, snappy as `datasets` writes them) for taper-data's reader tests.

    ~/.venvs/ref/bin/pip install pyarrow
    ~/.venvs/ref/bin/python scripts/golden/sft_parquet.py
"""
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/taper-data/tests/fixtures"
MSG = pa.struct([("role", pa.string()), ("content", pa.string())])


def main():
    messages = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"}],
    ]
    pq.write_table(pa.table({"messages": pa.array(messages, pa.list_(MSG))}), OUT / "sft_messages.parquet",
                   compression="snappy")
    mixed = pa.table({
        "prompt": pa.array([[{"role": "user", "content": "Name a colour."}], None], pa.list_(MSG)),
        "completion": pa.array([[{"role": "assistant", "content": "Red."}], None], pa.list_(MSG)),
        "text": pa.array([None, "To be, or not to be."], pa.string()),
    })
    pq.write_table(mixed, OUT / "sft_mixed.parquet", compression="snappy")


if __name__ == "__main__":
    main()
