"""Regenerate the bundled addition task: `python examples/data/make_addition.py`.

All 10,000 pairs a+b with 0 <= a, b <= 99, shuffled with a fixed seed; 500 are held out
for validation (never trained on), the rest are the training set. ResponseDataset format:
{"input": "12+34", "output": "46"}.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NUM_VALIDATION = 500


def main() -> None:
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(1234).shuffle(pairs)
    splits = {"validation": pairs[:NUM_VALIDATION], "train": pairs[NUM_VALIDATION:]}
    for split, rows in splits.items():
        with open(HERE / f"addition_{split}.jsonl", "w") as f:
            for a, b in rows:
                f.write(json.dumps({"input": f"{a}+{b}", "output": str(a + b)}) + "\n")


if __name__ == "__main__":
    main()
