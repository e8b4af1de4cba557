"""Load the result files a report is built from, and derive every number it shows.

Inputs are files only (``ReportInputs``): the influence index (Parquet shards + ``manifest.json``),
the query job's output (``topk.jsonl`` + ``summary.json``), the self-influence audit's output
(``self_influence_top.jsonl`` + ``self_influence_summary.json``), the eigensystem file, the data's
meta file (``digits_meta.json``: flipped ids, data patterns), optionally the demo's ``run.json``
(stage timings) and the model checkpoint (predicted labels). Nothing is taken from memory, so a
report built later from the same files shows the same numbers.

Which training labels are flipped: the index rows' ``flipped`` / ``true_y`` columns (record fields, as
carried from the training records) when present, else the meta file's ``flipped_ids``. The label is
optional: a spec without one (e.g. a translation model) has noisy examples instead — a boolean ``noisy``
column and a ``noise`` kind column (or the meta file's ``noisy_ids`` / ``noise_kinds``) — and the report
then shows the ROC-AUC per noise kind of self-influence, of self-influence with the complement term
(when the index holds ``grad_sq_norm``) and of the loss alone, and renders examples as text
(``ModelSpec.render``, else the records' text fields).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

from beam_influence import util
from beam_influence.core.diagnostics import relative_residuals
from beam_influence.core.scoring import LIST_QUESTIONS, list_question
from beam_influence.report import metrics as M

PROPONENT, OPPONENT = "proponent", "opponent"
# scores ranked for noisy-example detection, per noise kind: (metric name part, label)
NOISE_SCORES = (("self_influence", "self-influence"), ("complement", "self-influence + complement"),
                ("loss", "loss alone"))


@dataclasses.dataclass(frozen=True)
class ReportInputs:
    """Paths of the result files (local or any Beam filesystem). Only ``index_dir`` is required.

    ``train_data``/``test_data`` (record patterns, for the images) default to the meta file's
    patterns, then to the index manifest's ``train_data``; ``spec``/``checkpoint``/``eigensystem``
    default to the index manifest's arguments.
    """

    index_dir: str
    query_dir: str | None = None
    audit_dir: str | None = None
    eigensystem: str | None = None
    data_meta: str | None = None
    run_json: str | None = None
    train_data: str | None = None
    test_data: str | None = None
    spec: str | None = None
    spec_args: str | None = None  # JSON object
    checkpoint: str | None = None
    max_queries: int = 12
    max_suspects: int = 30
    image_key: str = "x"  # record field drawn as an image (square, e.g. 64 floats → 8×8)
    label_key: str = "y"  # record field holding the label (``true_<label_key>`` when present is the truth)
    noise_key: str = "noise"  # record field holding the noise kind of an example ("clean" when not noisy)


@dataclasses.dataclass
class IndexColumns:
    """The index without its projections: ids [N], self_influence [N], loss [N], label [N],
    flipped [N] (bool; None when unknown), true_label [N] (-1 where unknown)."""

    ids: np.ndarray
    self_influence: np.ndarray
    loss: np.ndarray
    label: np.ndarray
    flipped: np.ndarray | None
    true_label: np.ndarray
    flipped_source: str
    kinds: np.ndarray | None = None  # [N] str noise kind per example ("clean" for clean ones); None when unknown
    complement: np.ndarray | None = None  # [N] self-influence + (‖∇ℓ‖² − ‖P‖²)/ρ, when the index has grad_sq_norm
    has_label: bool = True  # False when the index's label column is all null (a spec without a label)


@dataclasses.dataclass
class Results:
    inputs: ReportInputs
    manifest: dict
    index: IndexColumns
    topk: list[dict]
    query_summary: dict
    audit: list[dict]
    audit_summary: dict
    eigensystem: Any  # beam_influence.core.eigensystem.Eigensystem | None
    meta: dict
    run: dict
    records: dict[str, dict]  # id -> record, for the examples shown
    predictions: dict[str, int]  # test id -> predicted label (empty without a loadable model)
    test_accuracy: float | None
    spec: Any = None  # the ModelSpec named by the index (for ``render``); None when it cannot be imported


# ---- reading ------------------------------------------------------------------------------------
def _join(d: str, name: str) -> str:
    return f"{d.rstrip('/')}/{name}"


def _exists(path: str | None) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return bool(path) and FileSystems.exists(path)


def read_json(path: str | None) -> dict:
    """A JSON object from ``path``; {} when the path is None or missing."""
    return util.read_json(path, default={})


def read_jsonl(path: str | None) -> list[dict]:
    return util.read_jsonl(path, default=[])


def read_index_columns(index_dir: str, flipped_ids: list[str] | None = None, *, noise_kinds: Mapping | None = None,
                       noise_key: str = "noise", eigvals: np.ndarray | None = None,
                       rho: float | None = None) -> IndexColumns:
    """Every index row's id, self-influence, loss, label and flipped flag (projections are read only for
    the complement: with ``eigvals``, when the index holds ``grad_sq_norm``; ``rho`` None = the default ρ).

    The shards are read through the manifest and verified (row counts, checksums). Ground truth of
    flipped labels comes from the record fields ``flipped`` / ``true_y`` that travel as index columns."""
    from beam_influence.beam.index import read_index_table

    t = read_index_table(index_dir)
    if t.num_rows == 0:
        raise FileNotFoundError(f"the index {index_dir!r} holds no rows; run `beam-influence index` first")
    names = t.column_names
    ids = np.asarray(t.column("id").to_pylist(), dtype=object)
    label = np.asarray(t.column("label").fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    has_label = t.column("label").null_count < t.num_rows
    kinds = None
    if noise_key in names and t.column(noise_key).null_count == 0:
        kinds = np.asarray([str(k) for k in t.column(noise_key).to_pylist()], dtype=object)
    elif noise_kinds is not None:
        kinds = np.asarray([str(noise_kinds.get(str(i), "clean")) for i in ids], dtype=object)
    if "flipped" in names and t.column("flipped").null_count == 0:
        flipped, source = np.asarray(t.column("flipped").to_numpy(zero_copy_only=False), bool), "index metadata"
    elif "noisy" in names and t.column("noisy").null_count == 0:
        flipped, source = np.asarray(t.column("noisy").to_numpy(zero_copy_only=False), bool), "index metadata"
    elif kinds is not None:
        flipped, source = kinds != "clean", "noise kinds"
    elif flipped_ids is not None:
        ids_set = set(flipped_ids)
        flipped, source = np.asarray([i in ids_set for i in ids]), "data meta flipped_ids"
    else:
        flipped, source = None, "unknown"
    true_label = (np.asarray(t.column("true_y").fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
                  if "true_y" in names else np.full(len(ids), -1, np.int64))
    self_inf = np.asarray(t.column("self_influence").to_numpy(), np.float64)
    complement = None
    if eigvals is not None and "grad_sq_norm" in names and t.column("grad_sq_norm").null_count == 0:
        from beam_influence.beam.project import projection_matrix
        from beam_influence.core.complement import complement_self_influence

        complement = complement_self_influence(projection_matrix(t), eigvals,
                                               np.asarray(t.column("grad_sq_norm").to_numpy(), np.float64), rho=rho)
    return IndexColumns(ids=ids, self_influence=self_inf,
                        loss=np.asarray(t.column("loss").to_numpy(), np.float64), label=label, flipped=flipped,
                        true_label=true_label, flipped_source=source, kinds=kinds, complement=complement,
                        has_label=bool(has_label))


def _patterns(inputs: ReportInputs, meta: Mapping, manifest: Mapping) -> tuple[str | None, str | None]:
    train, test = inputs.train_data, inputs.test_data
    pats = meta.get("patterns") or {}
    fmt = "parquet" if "parquet" in pats else next(iter(pats), None)
    if fmt:
        train = train or pats[fmt].get("train")
        test = test or pats[fmt].get("test")
    train = train or (manifest.get("args") or {}).get("train_data")
    return train, test


def _read_wanted(pattern: str | None, wanted: set[str]) -> dict[str, dict]:
    """Records of ``pattern`` whose id is in ``wanted`` (a scan; only the wanted ones are kept)."""
    from beam_influence.formats import iter_records, is_error_record, match_files

    out: dict[str, dict] = {}
    if not pattern or not wanted:
        return out
    for path in match_files(pattern):
        for rec in iter_records(path):
            if not is_error_record(rec) and rec["id"] in wanted:
                out[rec["id"]] = rec
    return out


def _load_model(inputs: ReportInputs, manifest: Mapping):
    """(spec, params) from the inputs or the index manifest; None when no checkpoint is named."""
    from beam_influence.core.model_spec import load_spec

    args = manifest.get("args") or {}
    spec_path = inputs.spec or args.get("spec")
    ckpt = inputs.checkpoint or args.get("checkpoint")
    if not spec_path or not _exists(ckpt):
        return None
    kwargs = json.loads(inputs.spec_args or args.get("spec_args") or "{}")
    spec = load_spec(spec_path, **kwargs)
    return spec, spec.load_params(ckpt)


def _predict(spec, params, records: list[dict]) -> dict[str, int]:
    """Predicted class (argmax of ``spec.apply``) of each decodable record; {} when the spec has no apply."""
    import jax
    import jax.numpy as jnp

    from beam_influence.core.model_spec import RecordError

    if spec.apply is None or spec.label_key is None:  # no label: nothing to classify
        return {}
    good, ids = [], []
    for rec in records:
        try:
            good.append(spec.decode(rec))
            ids.append(rec["id"])
        except RecordError:
            continue
    if not good:
        return {}
    batch = spec.stack(good)
    logits = jax.jit(jax.vmap(spec.apply, in_axes=(None, 0)))(params, batch)
    return dict(zip(ids, np.asarray(jnp.argmax(logits, -1)).tolist()))


def load_results(inputs: ReportInputs) -> Results:
    """Read every result file named by ``inputs`` (and the records of the examples shown)."""
    from beam_influence.beam.index import read_manifest
    from beam_influence.core.eigensystem import Eigensystem

    manifest = read_manifest(inputs.index_dir)
    meta = read_json(inputs.data_meta)
    es_path = inputs.eigensystem or (manifest.get("args") or {}).get("eigensystem")
    es = Eigensystem.load(es_path) if _exists(es_path) else None
    audit, asum = [], {}
    if inputs.audit_dir:
        audit = read_jsonl(_join(inputs.audit_dir, "self_influence_top.jsonl"))
        asum = read_json(_join(inputs.audit_dir, "self_influence_summary.json"))
    index = read_index_columns(inputs.index_dir, meta.get("flipped_ids") or meta.get("noisy_ids"),
                               noise_kinds=meta.get("noise_kinds"), noise_key=inputs.noise_key,
                               eigvals=None if es is None else es.eigvals, rho=_audit_term(asum).get("rho"))
    topk, qsum = [], {}
    if inputs.query_dir:
        topk = read_jsonl(_join(inputs.query_dir, "topk.jsonl"))
        qsum = read_json(_join(inputs.query_dir, "summary.json"))
    run = read_json(inputs.run_json)

    query_ids = shown_queries(topk, inputs.max_queries)
    train_wanted = {r["train_id"] for r in topk if r["query_id"] in set(query_ids)}
    train_wanted |= {r["id"] for r in audit[: inputs.max_suspects]}
    train_pat, test_pat = _patterns(inputs, meta, manifest)
    records = _read_wanted(train_pat, train_wanted)
    predictions, acc = {}, None
    test_records: list[dict] = []
    if test_pat:
        from beam_influence.formats import read_records

        test_records = [r for r in read_records(test_pat) if "__error__" not in r]
        records.update({r["id"]: r for r in test_records if r["id"] in set(query_ids)})
    model = _load_model(inputs, manifest) if test_records else None
    if model is not None:
        spec, params = model
        predictions = _predict(spec, params, test_records)
        label_key = spec.label_key
        scored = [r for r in test_records if r["id"] in predictions and label_key in r]
        if scored:
            acc = float(np.mean([predictions[r["id"]] == int(r[label_key]) for r in scored]))
    if acc is None and (run.get("model") or {}).get("accuracy_kind"):  # e.g. the translation demo's token accuracy
        acc = run["model"].get("test_accuracy")
    return Results(inputs=inputs, manifest=manifest, index=index, topk=topk, query_summary=qsum, audit=audit,
                   audit_summary=asum, eigensystem=es, meta=meta, run=run, records=records,
                   predictions=predictions, test_accuracy=acc,
                   spec=model[0] if model is not None else _spec_only(inputs, manifest))


def _spec_only(inputs: ReportInputs, manifest: Mapping):
    """The index's ModelSpec without its checkpoint (for ``render``); None when it cannot be loaded."""
    from beam_influence.core.model_spec import load_spec

    args = manifest.get("args") or {}
    path = inputs.spec or args.get("spec")
    if not path:
        return None
    try:
        return load_spec(path, **json.loads(inputs.spec_args or args.get("spec_args") or "{}"))
    except (ValueError, TypeError, ImportError):
        return None


def shown_queries(topk: list[dict], max_queries: int) -> list[str]:
    """The query ids the report shows: the first ``max_queries`` in id order."""
    return sorted({r["query_id"] for r in topk})[:max_queries]


def ranked(topk: list[dict], query_id: str, kind: str) -> list[dict]:
    return sorted((r for r in topk if r["query_id"] == query_id and r["kind"] == kind), key=lambda r: r["rank"])


# ---- the numbers ---------------------------------------------------------------------------------
def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _audit_term(audit_summary: Mapping) -> dict:
    """The complement term the self-influence audit scored with (its summary's ``complement``; {} when off)."""
    term = dict((audit_summary or {}).get("complement") or {})
    return term if term.get("mode") not in (None, "none") else {}


def audit_score(res: Results) -> tuple[np.ndarray, str, str]:
    """The score the self-influence audit ranked by, for every index row: ``(scores [N], name, label)``.

    ``complement`` (self-influence + (‖∇ℓ‖² − ‖P‖²)/ρ, with the audit's ρ) when the audit's summary says it
    scored with the complement term and the index holds ``grad_sq_norm``; else ``self_influence`` (the
    index's column: the top-k eigenspace only). Every ranking the report shows over the whole index (the
    headline ROC-AUC, recall, plots) uses this score, so it agrees with the audit's own top-N."""
    term = _audit_term(res.audit_summary)
    if term and res.index.complement is not None:
        rho = term.get("rho")
        return (res.index.complement, "complement",
                "self-influence + complement" + (f" (ρ = {float(rho):.3g})" if rho is not None else ""))
    return res.index.self_influence, "self_influence", "self-influence (top-k eigenspace only)"


def compute_metrics(res: Results) -> dict[str, Any]:
    """Every number the report shows in a ``data-metric`` element, keyed by that name (JSON-safe)."""
    idx = res.index
    m: dict[str, Any] = {
        "model_fingerprint": res.manifest.get("model_fingerprint"),
        "eigensystem_id": res.manifest.get("eigensystem_id"),
        "n_index_rows": int(len(idx.ids)),
        "index_manifest_rows": int(res.manifest.get("rows", len(idx.ids))),
        "dead_letters": int(res.manifest.get("dead_letters", 0)),
        "query_dead_letters": int(res.query_summary.get("query_dead_letters", 0)),
        "n_queries": len({r["query_id"] for r in res.topk}),
        "topk_rows": len(res.topk),
        "top_k": int(res.query_summary.get("top_k", max([r["rank"] for r in res.topk], default=0))),
        "audit_rows": len(res.audit),
        "test_accuracy": res.test_accuracy,
    }
    score, m["audit_score"], m["audit_score_label"] = audit_score(res)
    if res.query_summary:
        norm = res.query_summary.get("normalization", "none")
        m["normalization"] = norm
        m["lists_answer"] = list_question(norm)[0] if norm in LIST_QUESTIONS else None
    if idx.flipped is not None:
        flipped = idx.flipped
        ids = idx.ids.astype(str)
        m["n_flipped"] = int(flipped.sum())
        m["flipped_fraction"] = float(flipped.mean()) if len(flipped) else None
        m["auc"] = _finite(M.roc_auc(score, flipped))  # the headline: the audit's own score
        if m["audit_score"] != "self_influence":
            m["auc_self_influence_only"] = _finite(M.roc_auc(idx.self_influence, flipped))
        for f, r in M.recall_at_fractions(score, flipped, ids=ids).items():
            m[f"recall_at_{round(100 * f)}"] = _finite(r)
            m[f"inspected_at_{round(100 * f)}"] = M.num_inspected(f, len(ids))
        by_id = dict(zip(ids, flipped))
        m["audit_flipped"] = int(sum(bool(by_id.get(r["id"], False)) for r in res.audit))
        m["audit_precision"] = m["audit_flipped"] / len(res.audit) if res.audit else None
    if idx.kinds is not None and idx.flipped is not None:
        m.update(noise_metrics(idx))
    es = res.eigensystem
    if es is not None:
        rel = relative_residuals(es.ritz_values, es.residuals)
        ok = M.krylov_consistent(es.ritz_values, es.krylov_ritz_values)
        m.update({
            "krylov_consistent": ok,
            "k": es.k, "krylov_m": int(len(es.krylov_ritz_values)),
            "lambda_max": float(es.ritz_values[0]), "lambda_min_kept": float(es.ritz_values[-1]),
            "krylov_negatives": int((es.krylov_ritz_values < 0).sum()),
            "capture": _finite(M.spectrum_capture(es.ritz_values, es.krylov_ritz_values)) if ok else None,
            "max_rel_residual": _finite(float(np.nanmax(rel))) if np.isfinite(rel).any() else None,
            "median_rel_residual": _finite(float(np.nanmedian(rel))) if np.isfinite(rel).any() else None,
        })
    stages = (res.run or {}).get("stages") or []
    if stages:
        m["pipeline_seconds"] = float(sum(s.get("seconds", 0.0) for s in stages))
    return m


def noise_metrics(idx: IndexColumns) -> dict[str, Any]:
    """ROC-AUC of noisy-example detection per noise kind (noisy rows of that kind against every clean row) and
    over all kinds, for each score of ``NOISE_SCORES``: ``auc_<score>_<kind>`` (``auc_<score>_all``); plus
    ``noise_kinds`` (sorted) and ``n_noisy_<kind>``."""
    kinds = sorted({str(k) for k in idx.kinds[idx.flipped]})
    clean = ~idx.flipped
    scores = {"self_influence": idx.self_influence, "complement": idx.complement, "loss": idx.loss}
    out: dict[str, Any] = {"noise_kinds": kinds}
    for kind in ["all", *kinds]:
        pos = idx.flipped if kind == "all" else (idx.kinds == kind) & idx.flipped
        if kind != "all":
            out[f"n_noisy_{kind}"] = int(pos.sum())
        sel = pos | clean
        for name, _ in NOISE_SCORES:
            s = scores[name]
            out[f"auc_{name}_{kind}"] = None if s is None else _finite(M.roc_auc(s[sel], pos[sel]))
    return out
