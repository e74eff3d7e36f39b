"""Write the demo model's held-out documents to a text file, for `lmgen perplexity`.

    python benchmarks/demo_heldout.py            # -> benchmarks/results/demo-heldout.txt

Repeats the seeded split of scripts/train_demo_model.py (2% of the documents, which
the model never trained on) and joins the held-out texts with blank lines. Needs the
Debian packages the training script reads (bible-kjv, fortunes).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from train_demo_model import read_fortunes, read_kjv  # noqa: E402

# The training script's defaults (--seed, --heldout-frac).
SEED, HELDOUT_FRACTION = 1234, 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo-heldout.txt")
    args = parser.parse_args()
    split = random.Random(SEED)
    held_out = [doc.text for doc in read_kjv() + read_fortunes() if split.random() < HELDOUT_FRACTION]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(held_out) + "\n", encoding="utf-8")
    print(f"{len(held_out)} held-out documents, {sum(map(len, held_out)):,} characters -> {args.out}")


if __name__ == "__main__":
    main()
