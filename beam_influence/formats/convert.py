"""Write the built-in digits data set in every record format.

    python -m beam_influence.formats.convert --out DIR [--formats parquet jsonl npz tfrecord] [--num-shards 2]

writes ``DIR/<format>/train-0000i-of-0000n.<ext>`` and ``DIR/<format>/test-…`` for each format, and
``DIR/digits_meta.json`` (the ids of the training examples whose label was flipped, the settings).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from beam_influence.formats import FORMATS, write_records

META_FILE = "digits_meta.json"


def convert_digits(out_dir: str, formats: Sequence[str] = FORMATS, num_shards: int = 2, label_noise: float = 0.1,
                   seed: int = 0) -> dict:
    """Write digits train/test splits (``load_digits(label_noise=, seed=)``) in each format.

    Returns ``{format: {"train": pattern, "test": pattern}}`` with glob patterns for ``read_records`` /
    ``ReadExamples``. Also writes ``out_dir/digits_meta.json`` with the flipped ids.
    """
    from apache_beam.io.filesystems import FileSystems

    from beam_influence.models.digits import load_digits

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown formats {unknown}; expected some of {FORMATS}")
    data = load_digits(label_noise=label_noise, seed=seed)
    patterns: dict[str, dict[str, str]] = {}
    for fmt in formats:
        fmt_dir = FileSystems.join(out_dir, fmt)
        patterns[fmt] = {}
        for split, records in (("train", data.train), ("test", data.test)):
            write_records(records, FileSystems.join(fmt_dir, split), fmt, num_shards)
            patterns[fmt][split] = FileSystems.join(fmt_dir, f"{split}-*")
    meta = {"label_noise": label_noise, "seed": seed, "num_shards": num_shards, "n_train": len(data.train),
            "n_test": len(data.test), "flipped_ids": list(data.flipped_ids), "patterns": patterns}
    with FileSystems.create(FileSystems.join(out_dir, META_FILE)) as f:
        f.write(json.dumps(meta, indent=1).encode("utf-8"))
    return patterns
