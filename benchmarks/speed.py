"""Speed benchmark (issue 5): ECE vs EasyEdit's MEMIT and AlphaEdit on the same records and batches.

The same code as ``ece-plugin bench --timing``; every option of that command is accepted, e.g.

    python benchmarks/speed.py --model testbed/testbed-llama --n-edits 400 --batch-sizes 100
    PYTHONPATH=/path/to/EasyEdit:. python benchmarks/speed.py --model /models/llama3-8b \
        --hparams hparams/ECE/llama3-8b.yaml --n-edits 2000 --batch-sizes 100 --device cuda

Writes timing.json / timing.csv / timing.md / timing.png into --out (default runs/bench-<timestamp>/).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ece_plugin.lab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--timing", *sys.argv[1:]]))
