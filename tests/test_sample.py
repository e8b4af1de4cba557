"""The streamed, seeded sample of the eigensystem job (beam_influence.data.sample_examples) and load_examples."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_influence import data as data_mod
from beam_influence.data import id_hash, load_examples, sample_examples
from beam_influence.formats import write_records
from beam_influence.models import digits


@pytest.fixture(scope="module")
def spec():
    return digits.logreg()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The digits training records as Parquet (3 shards) and JSONL (2 shards)."""
    root = tmp_path_factory.mktemp("sample")
    d = digits.load_digits(seed=1)
    write_records(d.train, str(root / "pq" / "train"), "parquet", 3)
    write_records(d.train, str(root / "js" / "train"), "jsonl", 2)
    return {"parquet": str(root / "pq" / "train*"), "jsonl": str(root / "js" / "train*"),
            "ids": [r["id"] for r in d.train], "records": d.train, "root": root}


def _bottom_k(ids, size, seed):
    h = id_hash(np.asarray(ids), seed)
    order = np.lexsort((np.asarray(ids), h))
    return sorted(np.asarray(ids)[order[:size]].tolist())


def test_sample_is_bottom_k_by_hash_and_deterministic(spec, shards):
    s = sample_examples(spec, shards["parquet"], size=200, seed=7)
    assert s.n == 200 and len(set(s.ids)) == 200 and not s.bad
    assert sorted(s.ids) == _bottom_k(shards["ids"], 200, 7)
    again = sample_examples(spec, shards["parquet"], size=200, seed=7)
    assert again.ids == s.ids
    np.testing.assert_array_equal(again.batch["x"], s.batch["x"])
    other = sample_examples(spec, shards["parquet"], size=200, seed=8)
    assert len(set(other.ids) & set(s.ids)) < 100  # another seed, another sample (expected overlap ~28)
    assert s.stats["records_read"] == len(shards["ids"]) and s.stats["kept"] == 200
    assert s.stats["seed"] == 7 and s.stats["sample_size"] == 200


def test_sample_rows_match_their_records(spec, shards):
    s = sample_examples(spec, shards["parquet"], size=50, seed=0)
    by_id = {r["id"]: r for r in shards["records"]}
    for i, rid in enumerate(s.ids):
        np.testing.assert_allclose(s.batch["x"][i], np.asarray(by_id[rid]["x"], np.float32))
        assert s.batch["y"][i] == by_id[rid]["y"]


@pytest.mark.parametrize("rows_per_split,batch_rows", [(65536, 65536), (100, 100), (64, 7)])
def test_sample_does_not_depend_on_chunking_or_format(spec, shards, rows_per_split, batch_rows):
    ref = sample_examples(spec, shards["parquet"], size=150, seed=3)
    s = sample_examples(spec, shards["parquet"], size=150, seed=3, rows_per_split=rows_per_split, batch_rows=batch_rows)
    assert s.ids == ref.ids
    js = sample_examples(spec, shards["jsonl"], size=150, seed=3, batch_rows=batch_rows)
    assert sorted(js.ids) == sorted(ref.ids)  # same records (own ids), whatever the format and file layout


def test_sample_larger_than_data_keeps_everything(spec, shards):
    s = sample_examples(spec, shards["parquet"], size=10**6, seed=0)
    assert sorted(s.ids) == sorted(shards["ids"]) and s.stats["kept"] == len(shards["ids"])


def test_id_hash_is_stable():
    # fixed values: the sample of a seed must not change across versions or platforms
    h = id_hash(np.asarray(["a", "train-00001", "", "ünïcode-ïd-longer-than-sixteen-bytes"]), 0)
    assert h.dtype == np.uint64 and len(set(h.tolist())) == 4
    assert id_hash(["train-00001"], 0)[0] == h[1]  # independent of the other ids in the chunk (padding)
    assert id_hash(["train-00001"], 1)[0] != h[1]


def _jsonl_with_bad_records(path, records):
    lines = [json.dumps({k: (v if not isinstance(v, np.ndarray) else v.tolist()) for k, v in r.items()})
             for r in records]
    lines[3] = "{not json"
    lines[10] = json.dumps(dict(records[10], y=42))  # label out of range
    lines[20] = json.dumps(dict(records[20], x=[0.0] * 5))  # wrong shape
    path.write_text("\n".join(lines) + "\n")


def test_bad_records_are_counted_and_returned(spec, shards, tmp_path):
    recs = shards["records"][:300]
    _jsonl_with_bad_records(tmp_path / "bad.jsonl", recs)
    pattern = str(tmp_path / "bad.jsonl")
    s = sample_examples(spec, pattern, size=1000, seed=0)
    assert s.n == 297 and len(s.bad) == 3 and s.stats["rejected"] == 3 and s.stats["records_read"] == 300
    reasons = " | ".join(b["reason"] for b in s.bad)
    assert "JSON" in reasons and "range" in reasons and "shape" in reasons
    assert {recs[10]["id"], recs[20]["id"]} <= {b["id"] for b in s.bad}
    assert not ({b["id"] for b in s.bad} & set(s.ids))
    small = sample_examples(spec, pattern, size=10, seed=0)
    assert small.n == 10 and len(small.bad) == 3  # bad records outside the sample are counted too
    full = load_examples(spec, pattern)
    assert full.n == 297 and len(full.bad) == 3


def test_no_decodable_record_names_the_pattern(spec, tmp_path):
    (tmp_path / "junk.jsonl").write_text('{"id": "a", "x": [1, 2]}\n{"id": "b"}\n')
    pattern = str(tmp_path / "junk.jsonl")
    with pytest.raises(ValueError, match="junk.jsonl"):
        sample_examples(spec, pattern, size=10, seed=0)
    with pytest.raises(ValueError, match="junk.jsonl"):
        load_examples(spec, pattern)
    with pytest.raises(FileNotFoundError):
        sample_examples(spec, str(tmp_path / "missing-*.parquet"), size=10, seed=0)
    with pytest.raises(ValueError, match="size"):
        sample_examples(spec, pattern, size=0, seed=0)


def test_load_examples_reads_everything_in_file_order(spec, shards):
    a = load_examples(spec, shards["parquet"])
    b = load_examples(spec, shards["jsonl"], keep_records=True, batch_rows=100)
    assert a.ids == shards["ids"] == b.ids and a.stats["records_read"] == len(a.ids)
    np.testing.assert_array_equal(a.batch["x"], b.batch["x"])
    np.testing.assert_array_equal(a.batch["y"], b.batch["y"])
    assert len(b.records) == b.n and b.records[0]["id"] == b.ids[0]
    capped = load_examples(spec, shards["parquet"], max_examples=100, seed=4)  # the old API: a seeded sample
    assert capped.ids == sample_examples(spec, shards["parquet"], size=100, seed=4).ids


def _write_big_parquet(path, n, *, row_group_size):
    rng = np.random.default_rng(0)
    x = rng.random((n, 64), dtype=np.float32)
    table = pa.table({"id": [f"r{i:06d}" for i in range(n)],
                      "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64),
                      "y": rng.integers(0, 10, n)})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_sample_holds_size_plus_one_chunk(spec, tmp_path, monkeypatch):
    """20k records in 10 splits, size 500: never more than 500 + one chunk of decoded rows in memory."""
    path = str(tmp_path / "big.parquet")
    _write_big_parquet(path, 20_000, row_group_size=2_000)
    chunk_rows = []
    decode = data_mod._decode_batch

    def counting(spec, batch):
        chunk_rows.append(batch.num_rows)
        return decode(spec, batch)

    monkeypatch.setattr(data_mod, "_decode_batch", counting)
    s = sample_examples(spec, path, size=500, seed=1, rows_per_split=2_000, batch_rows=2_000)
    assert s.stats["splits"] == 10 and sum(chunk_rows) == 20_000 and len(chunk_rows) >= 10
    assert max(chunk_rows) <= 2_000
    assert s.n == 500 and s.stats["peak_rows_held"] <= 500 + max(chunk_rows)
    assert sorted(s.ids) == _bottom_k([f"r{i:06d}" for i in range(20_000)], 500, 1)
    # after the sample fills, a chunk contributes only the rows hashing below the current threshold
    # (expected ~ 500·2000/seen), so the sampler's arrays stay close to 500 rows
    assert s.stats["peak_rows_held"] < 2 * 500 + 2_000


def test_cli_eigensystem_streams_a_sample(spec, shards, tmp_path, capsys):
    from beam_influence.cli import main
    from beam_influence.core.eigensystem import Eigensystem

    ckpt = str(tmp_path / "params.msgpack")
    spec.save_params(ckpt, spec.init(0))
    out = str(tmp_path / "eig.safetensors")
    argv = ["eigensystem", "--spec", "beam_influence.models.digits:logreg", "--checkpoint", ckpt,
            "--train_data", shards["parquet"], "--output", out, "--num_iters", "8", "--num_eigenpairs", "3",
            "--curvature_batch_size", "64", "--micro_batch", "16", "--sample_size", "300", "--seed", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"read {len(shards['ids'])} records" in printed and "300 sampled" in printed and "0 rejected" in printed
    es = Eigensystem.load(out)
    assert es.args["sample_size"] == 300 and es.args["sample_size_used"] == 300 and es.args["sample_seed"] == 5
    assert es.args["micro_batch"] == 16 and es.args["sample_records_read"] == len(shards["ids"])
