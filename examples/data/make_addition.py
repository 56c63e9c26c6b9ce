"""Regenerate the bundled addition task: `python examples/data/make_addition.py`.

All 10,000 pairs a+b with 0 <= a, b <= 99, shuffled with a fixed seed; 500 are held out
for validation (never trained on), the rest are the training set. ResponseDataset format,
fixed width: two 2-digit operands and a 3-digit sum, {"input": "07+45", "output": "052"}.
Fixed width puts every digit at the same place in every example, so a tiny model learns the
task in fewer steps: 86.8% exact match after 500 steps, where the unpadded form (`7+45` ->
`52`) needed about 700 (bench/README.md, "quickstart.py").
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
                f.write(json.dumps({"input": f"{a:02d}+{b:02d}", "output": f"{a + b:03d}"}) + "\n")


if __name__ == "__main__":
    main()
