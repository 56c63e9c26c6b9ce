"""See what the model will be trained on: tokens, with trained ones highlighted.

    uv run examples/preview_data.py --config examples/configs/quickstart.yaml [overrides]
        [--split train|validation] [--num N] [--json]

`--json` prints one JSON object per example on stdout and nothing else (logs go to
stderr): `input_ids`, `tokens` (`tokenizer.decode([id])` per id), `loss_mask`
(1 = trained target), `reasoning_mask` (1 = reasoning text, trained or not), `length`,
`truncated`, `dropped` (null or the reason), `task_name`.

In the text view trained tokens are green ([[...]] without colour), trained reasoning
blue ({{...}}) and untrained reasoning cyan text ((...)).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, TextIO

from sftkit.config.schema import MasterConfig
from sftkit.data.prepare import first_items, settings_from_config
from sftkit.data.processor import ORIGIN_KEY, Processor
from sftkit.data.tokenizer import load_tokenizer
from sftkit.log.redact import install_redaction

logger = logging.getLogger("sftkit")
TRAINED_ON, TRAINED_OFF = "\x1b[1;30;42m", "\x1b[0m"  # black on green
REASONING_ON = "\x1b[1;30;44m"  # trained reasoning: black on blue
REASONING_OFF = "\x1b[36m"  # untrained reasoning: cyan text
# (start, end) marks per token kind: 0 untrained, 1 trained, 2 untrained / 3 trained reasoning
COLOURS = {
    1: (TRAINED_ON, TRAINED_OFF),
    2: (REASONING_OFF, TRAINED_OFF),
    3: (REASONING_ON, TRAINED_OFF),
}
BRACKETS = {1: ("[[", "]]"), 2: ("((", "))"), 3: ("{{", "}}")}


def preview_records(
    cfg: MasterConfig, tokenizer: Any, split: str = "train", num: int = 3
) -> list[dict[str, Any]]:
    """The first `num` rows of a split, processed exactly as training processes them."""
    items = first_items(cfg.data, split, num)
    settings = settings_from_config(cfg.data, cfg.policy, cfg.sft.only_unmask_final)
    processor = Processor(tokenizer, settings)
    records = []
    for k, (row, task) in enumerate(items):
        where = str(row.get(ORIGIN_KEY, f"{split} row {k}"))
        detail = processor.explain(row, where)
        ids, mask = detail["input_ids"], detail["loss_mask"]
        outcome = processor.apply_policy(ids, mask, task, where, detail["deselected"])
        if outcome.example is not None:
            ids, mask = outcome.example.input_ids, outcome.example.loss_mask
        records.append(
            {
                "input_ids": ids,
                "tokens": [tokenizer.decode([i]) for i in ids],
                "loss_mask": mask,
                "reasoning_mask": detail["reasoning_mask"][: len(ids)],
                "length": len(ids),
                "truncated": bool(outcome.example and outcome.example.truncated),
                "dropped": outcome.dropped,
                "task_name": task,
                "origin": where,
            }
        )
    return records


def render_highlighted(record: dict[str, Any], tokenizer: Any, color: bool) -> str:
    """Decoded text with trained runs and reasoning marked (ANSI colours, or brackets)."""
    marks = COLOURS if color else BRACKETS
    reasoning = record.get("reasoning_mask") or [0] * len(record["input_ids"])
    out: list[str] = []
    run: list[int] = []
    kind = None
    for token, m, r in zip(record["input_ids"], record["loss_mask"], reasoning, strict=True):
        k = bool(m) + 2 * bool(r)
        if kind is not None and k != kind:
            out.append(_piece(tokenizer, run, marks.get(kind)))
            run = []
        run.append(token)
        kind = k
    if run:
        out.append(_piece(tokenizer, run, marks.get(kind or 0)))
    return "".join(out)


def _piece(tokenizer: Any, ids: list[int], mark: tuple[str, str] | None) -> str:
    text = tokenizer.decode(ids)
    return f"{mark[0]}{text}{mark[1]}" if mark else text


def print_records(
    records: list[dict[str, Any]], tokenizer: Any, as_json: bool, stream: TextIO
) -> None:
    for k, record in enumerate(records):
        if as_json:
            stream.write(
                json.dumps(
                    {key: v for key, v in record.items() if key != "origin"}, ensure_ascii=False
                )
                + "\n"
            )
            continue
        trained = sum(record["loss_mask"])
        flags = [f"{record['length']} tokens", f"{trained} trained"]
        flags += ["truncated"] * record["truncated"]
        flags += [f"dropped: {record['dropped']}"] * bool(record["dropped"])
        stream.write(
            f"--- example {k} [{record['task_name']}] {record['origin']} ({', '.join(flags)})\n"
        )
        color = stream.isatty() and "NO_COLOR" not in os.environ
        stream.write(render_highlighted(record, tokenizer, color) + "\n")
    if not as_json:
        legend = (
            " (green); reasoning blue when trained, cyan when not"
            if stream.isatty()
            else " as [[...]]; reasoning {{trained}}, ((not trained))"
        )
        stream.write("trained tokens are highlighted" + legend + "\n")


def main(argv: list[str] | None = None) -> int:
    """`examples/preview_data.py` and `sftkit preview` (errors: `sftkit.cli.preview_main`)."""
    from sftkit.errors import ArgumentParser

    parser = ArgumentParser(description="Show tokenized examples and which tokens are trained.")
    parser.add_argument(
        "--config", default=None, help="YAML config (default: examples/configs/sft.yaml)"
    )
    parser.add_argument("--split", choices=("train", "validation"), default="train")
    parser.add_argument("--num", type=int, default=3, help="examples to show")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout, logs on stderr")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra-style overrides, e.g. data.num_workers=2"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    install_redaction()  # the root handler above prints config warnings: scrub them too
    from sftkit.config.load import load_config  # the config package; imported at call time

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.policy)
    records = preview_records(cfg, tokenizer, args.split, args.num)
    print_records(records, tokenizer, args.json, sys.stdout)
    return 0


if __name__ == "__main__":
    from sftkit.cli import preview_main

    raise SystemExit(preview_main(sys.argv[1:]))
