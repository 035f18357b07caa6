"""Golden check of taper's TensorBoard event files with TensorBoard's own reader (outside CI).

    python scripts/golden/tensorboard_events.py RUN_DIR

Loads RUN_DIR/tb with tensorboard's EventAccumulator (which purges a restarted run's tail at
each SessionLog START) and asserts its scalars equal every number of RUN_DIR/metrics.jsonl,
step for step (as float32, TensorBoard's scalar type), and that the config and samples are
there as text. Needs `pip install tensorboard`.
"""
import json
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run):
    ea = EventAccumulator(f"{run}/tb", size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    ea.Reload()
    tb = {}
    for tag in ea.Tags()["scalars"]:
        for e in ea.Scalars(tag):
            assert (tag, e.step) not in tb, f"{tag} twice at step {e.step}"
            tb[(tag, e.step)] = np.float32(e.value)
    want = {}
    with open(f"{run}/metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    want[(k, rec["step"])] = np.float32(v)
    missing = sorted(set(want) - set(tb))
    extra = sorted(set(tb) - set(want))
    differ = sorted(k for k in set(want) & set(tb) if want[k] != tb[k])
    assert not missing and not extra and not differ, (missing[:5], extra[:5], differ[:5])
    texts = ea.Tags()["tensors"]
    assert "config" in texts and any(t.startswith("samples/") for t in texts), texts
    print(f"{run}: {len(tb)} scalars equal metrics.jsonl; text tags {sorted(texts)}; "
          f"{len(ea.Tags()['histograms'])} histogram tags")


if __name__ == "__main__":
    main(sys.argv[1])
