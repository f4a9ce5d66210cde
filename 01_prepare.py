"""Stage 1: load and validate the dataset, infer the schema, hold out the test set.

Writes to artifacts/: train.parquet, test.parquet and prepared.json (schema, reference
statistics of the training split for drift monitoring, split method, fingerprints).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from rareml.artifacts import Layout, file_sha256, write_json
from rareml.cli import run, stage_parser
from rareml.config import load_config
from rareml.data import (
    LABEL,
    frame_fingerprint,
    infer_schema,
    load_tables,
    prepare,
    reference_stats,
    split,
    split_warnings,
)

log = logging.getLogger("01_prepare")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="this data file instead of the config's (06_retrain.py)")
    parser.add_argument("--test-data", type=Path, help="this separate test file instead of the config's split")
    parser.add_argument("--weight", help="the column of row weights, instead of the config's")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    given = {"data": args.data and args.data.resolve(), "test_data": args.test_data and args.test_data.resolve(),
             "weight": args.weight}
    config = dataclasses.replace(config, **{k: v for k, v in given.items() if v})
    layout = Layout(args.artifacts)
    raw = load_tables(config)
    raw.index.name = "_row"
    prepared = prepare(raw, config)
    train, test, how = split(prepared.frame, config)
    schema = infer_schema(train, prepared.kinds, config, prepared.ignored)
    for warning in split_warnings(train, test, prepared.kinds):
        log.warning("%s: consider adding it to `drop` in %s", warning, config.path.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    train.to_parquet(layout.train)
    test.to_parquet(layout.test)
    write_json(layout.prepared, {
        "config": {"name": config.name, "path": config.path, "data": config.data, "test_data": config.test_data,
                   "weight": config.weight},
        "split": how,
        "rows": {"train": len(train), "test": len(test)},
        "positives": {"train": int(train[LABEL].sum()), "test": int(test[LABEL].sum())},
        "dropped": prepared.dropped,
        "fingerprint": {"data_file_sha256": file_sha256(config.data),
                        "train": frame_fingerprint(train), "test": frame_fingerprint(test)},
        "schema": schema.to_dict(),
        "reference": reference_stats(train, schema),
    })
    n_cat = sum(f.kind == "categorical" for f in schema.features)
    log.info("%s: %d features (%d categorical); train %d rows (%.2f%% positive), test %d rows (%.2f%%); %s",
             config.name, len(schema.features), n_cat, len(train), 100 * train[LABEL].mean(),
             len(test), 100 * test[LABEL].mean(), how)


if __name__ == "__main__":
    run(main)
