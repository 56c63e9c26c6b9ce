"""Show tokenized examples with trained tokens highlighted (see sftkit/data/preview.py).

    uv run examples/preview_data.py --config examples/configs/sft.yaml [overrides] \
        [--split train|validation] [--num N] [--json]
"""

import sys

from sftkit.data.preview import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
