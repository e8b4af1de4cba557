"""One static HTML page from the result files: images inlined as base64 PNG, no scripts, readable offline.

Sections (each an element with an ``id``): ``summary``, ``sign-convention``, ``queries``, ``audit``,
``spectrum``, ``metadata``. Every key number sits in an element ``<span data-metric="NAME"
data-value="RAW">shown</span>``, where RAW is the exact value (``repr`` of the float) and ``shown``
its rounded text, so tests and scripts can read the page. Tiles of training examples carry
``data-train-id``, ``data-kind``, ``data-rank``, ``data-score`` (query section) or ``data-rank``,
``data-self-influence`` (audit section) and ``data-flipped``.

The label is optional: for a spec without one (``label_key=None``, e.g. a translation model) tiles show
the example as text (``ModelSpec.render``, else the record's ``*_text`` fields) with its numeric metadata,
noisy examples carry a ``NOISY · <kind>`` badge (``data-noise``), classification-only panels (true and
predicted label) are left out, and the audit shows the ROC-AUC per noise kind (``#noise-auc``).
"""
from __future__ import annotations

import datetime as _dt
import html
import json
from typing import Any, Iterable

import numpy as np

from beam_influence.report import metrics as M
from beam_influence.report import plots
from beam_influence.core.diagnostics import relative_residuals
from beam_influence.core.scoring import LIST_QUESTIONS
from beam_influence.report.results import OPPONENT, PROPONENT, ReportInputs, Results, compute_metrics, load_results
from beam_influence.report.results import audit_score, ranked, shown_queries

CSS = """
:root { --flip: #c62828; --ok: #2e7d32; --pro: #1b5e20; --opp: #b71c1c; --muted: #666; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1a1a1a; }
main { max-width: 1180px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 19px; margin-top: 36px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 14px 0 6px; }
nav a { margin-right: 14px; } .muted { color: var(--muted); }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 8px 14px; min-width: 120px; background: #fafafa; }
.card .big { font-size: 22px; font-weight: 600; display: block; } .card .lbl { color: var(--muted); font-size: 12px; }
.note { background: #f3f6fb; border-left: 4px solid #1565c0; padding: 8px 14px; margin: 12px 0; }
.query { border: 1px solid #e2e2e2; border-radius: 8px; padding: 10px 12px; margin: 14px 0; }
.qhead { display: flex; gap: 16px; align-items: center; }
.row { display: flex; flex-wrap: wrap; gap: 6px; margin: 4px 0 8px; }
.rowlabel { font-size: 12px; font-weight: 600; margin-top: 6px; }
.rowlabel.pro { color: var(--pro); } .rowlabel.opp { color: var(--opp); }
figure.tile { margin: 0; width: 92px; text-align: center; font-size: 11px; border: 2px solid transparent;
  border-radius: 6px; padding: 3px; background: #fff; }
figure.tile img { width: 48px; height: 48px; image-rendering: pixelated; border: 1px solid #ccc; }
figure.tile.flipped { border-color: var(--flip); background: #fdecea; }
figure.tile figcaption { line-height: 1.3; } .tid { word-break: break-all; font-size: 10px; }
.badge { display: inline-block; background: var(--flip); color: #fff; border-radius: 3px; padding: 0 4px;
  font-weight: 600; font-size: 10px; white-space: nowrap; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots img.plot { width: 540px; }
.right { color: var(--ok); font-weight: 600; } .wrong { color: var(--flip); font-weight: 600; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
.flex { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure.tile.text { width: 230px; text-align: left; background: #fcfcfc; border-color: #eee; }
figure.tile.text.flipped { border-color: var(--flip); background: #fdecea; }
.seq { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; word-break: break-all; }
.seq .cap { color: var(--muted); font-family: system-ui, sans-serif; font-size: 10px; margin-right: 4px; }
.meta { color: var(--muted); font-size: 10px; }
"""

SIGN_CONVENTION = (
    "influence(z<sub>test</sub>, z<sub>train</sub>) = Σ<sub>i≤k</sub> P<sub>i</sub>(z<sub>test</sub>) "
    "P<sub>i</sub>(z<sub>train</sub>) / λ<sub>i</sub> ≈ ∇ℓ(z<sub>test</sub>)<sup>T</sup> H<sup>−1</sup> "
    "∇ℓ(z<sub>train</sub>), with P(z) the gradient of the loss projected on the top-k Hessian eigenvectors "
    "(Arnoldi; Schioppa et al., arXiv 2112.03052). <b>Larger = more helpful</b>: up-weighting the training "
    "example lowers the test loss — a <b>proponent</b>. The most negative scores are <b>opponents</b> "
    "(up-weighting them raises the test loss). Self-influence(z) = Σ<sub>i</sub> P<sub>i</sub>(z)² / λ<sub>i</sub>: "
    "large for examples the rest of the data cannot explain, such as flipped labels."
)


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _raw(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "n/a"
    if spec == "%":
        return f"{100 * float(value):.1f}%"
    if spec:
        return format(value, spec)
    return str(value)


def metric(name: str, value: Any, spec: str = "") -> str:
    """``<span data-metric=name data-value=raw>shown</span>``."""
    return (f'<span class="metric" data-metric="{esc(name)}" data-value="{esc(_raw(value))}">'
            f"{esc(fmt(value, spec))}</span>")


def card(label: str, name: str, value: Any, spec: str = "") -> str:
    return (f'<div class="card"><span class="big">{metric(name, value, spec)}</span>'
            f'<span class="lbl">{esc(label)}</span></div>')


def table(rows: Iterable[Iterable[str]], head: Iterable[str] | None = None) -> str:
    """Cells are HTML already (escape before)."""
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def img(png: bytes | None, alt: str, cls: str = "") -> str:
    if png is None:  # not an image-like record: the caption says which example it is
        return ""
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{esc(alt)}" src="{plots.data_uri(png)}">'


TEXT_SKIP = {"id", "noisy", "flipped"}


def example_text(rec: dict | None, spec: Any) -> list[tuple[str, str]]:
    """(caption, text) pairs of an example: ``spec.render(rec)`` when the spec has it, else its ``*_text`` fields."""
    if rec is None:
        return []
    if spec is not None and getattr(spec, "render", None) is not None:
        try:
            return [(str(k), str(v)) for k, v in spec.render(rec).items()]
        except Exception:  # noqa: BLE001 - a record the spec cannot render falls back to its text fields
            pass
    return [(k[: -len("_text")], str(v)) for k, v in rec.items() if k.endswith("_text") and isinstance(v, str)]


def example_metadata(rec: dict | None, spec: Any) -> list[tuple[str, Any]]:
    """Scalar numeric/text metadata of a record (not its features, id or ground-truth flags)."""
    if rec is None:
        return []
    features = set(getattr(spec, "features", {}) or {})
    out = []
    for k, v in rec.items():
        if k in TEXT_SKIP or k in features or k.endswith("_text"):
            continue
        if isinstance(v, (bool, int, float, str)) and not (isinstance(v, str) and len(v) > 40):
            out.append((k, v))
    return out


class _Tiles:
    """Renders example tiles, caching each example's PNG (an example often appears more than once)."""

    def __init__(self, res: Results):
        self.res, self.cache = res, {}
        idx = res.index
        self.row = {str(i): j for j, i in enumerate(idx.ids)}
        self.has_label = idx.has_label

    def text(self, rid: str) -> str:
        """The example as text lines (HTML) and its metadata; '' for image examples."""
        rec = self.res.records.get(rid)
        if self.png(rid) is not None or rec is None:
            return ""
        lines = "".join(f'<div class="seq"><span class="cap">{esc(c)}</span>{esc(t)}</div>'
                        for c, t in example_text(rec, self.res.spec))
        meta = " · ".join(f"{esc(k)} {esc(fmt(v))}" for k, v in example_metadata(rec, self.res.spec))
        return lines + (f'<div class="meta">{meta}</div>' if meta else "")

    def png(self, rid: str) -> bytes | None:
        if rid not in self.cache:
            rec = self.res.records.get(rid)
            key = self.res.inputs.image_key
            self.cache[rid] = plots.digit_png(rec[key]) if rec is not None and key in rec else None
        return self.cache[rid]

    def train_info(self, rid: str) -> tuple[int | None, bool, int | None]:
        """(given label, flipped, true label) of a training example, from the index."""
        idx = self.res.index
        j = self.row.get(rid)
        if j is None:
            return None, False, None
        flipped = bool(idx.flipped[j]) if idx.flipped is not None else False
        true = int(idx.true_label[j]) if idx.true_label[j] >= 0 else None
        return int(idx.label[j]), flipped, true

    def kind(self, rid: str) -> str | None:
        j = self.row.get(rid)
        kinds = self.res.index.kinds
        return None if j is None or kinds is None else str(kinds[j])

    def train_tile(self, rid: str, top: str, attrs: dict[str, Any]) -> str:
        label, flipped, true = self.train_info(rid)
        kind = self.kind(rid)
        if not self.has_label:  # no label: the example as text, a badge naming the noise kind
            badge = f'<br><span class="badge">NOISY · {esc(kind)}</span>' if flipped else ""
            text = self.text(rid)
            data = "".join(f' data-{k}="{esc(_raw(v))}"' for k, v in attrs.items())
            noise = f' data-noise="{esc(kind)}"' if kind is not None else ""
            return (f'<figure class="tile text{" flipped" if flipped else ""}" data-train-id="{esc(rid)}"'
                    f' data-flipped="{_raw(flipped)}"{noise}{data}>{img(self.png(rid), rid)}'
                    f"<figcaption>{top}{badge}{text}<span class=\"muted tid\">{esc(rid)}</span>"
                    "</figcaption></figure>")
        badge = f'<br><span class="badge">FLIPPED · true {esc(true)}</span>' if flipped else ""
        data = "".join(f' data-{k}="{esc(_raw(v))}"' for k, v in attrs.items())
        return (f'<figure class="tile{" flipped" if flipped else ""}" data-train-id="{esc(rid)}"'
                f' data-flipped="{_raw(flipped)}"{data}>{img(self.png(rid), rid)}'
                f"<figcaption>{top}<br>label <b>{esc(label)}</b>{badge}<br><span class=\"muted tid\">{esc(rid)}</span>"
                "</figcaption></figure>")


def _summary(res: Results, m: dict) -> str:
    total = (res.run or {}).get("total_seconds")
    cards = []
    noun = "noisy examples" if "noise_kinds" in m else "flipped labels"
    if "auc" in m:  # ground truth of flipped labels (or noisy examples) is known
        cards += [card(f"{'noisy-example' if 'noise_kinds' in m else 'mislabel'} ROC-AUC by the audit's score: "
                       f"{m['audit_score_label']}", "auc", m["auc"], ".3f"),
                  card(f"{noun} found in top 10%", "recall_at_10", m["recall_at_10"], "%")]
    if m.get("test_accuracy") is not None:
        kind = (res.run.get("model") or {}).get("accuracy_kind", "model test accuracy") if res.run else "model test accuracy"
        cards.append(card(kind, "test_accuracy", m["test_accuracy"], "%"))
    cards.append(card("training examples indexed", "n_index_rows", m.get("n_index_rows")))
    if "n_flipped" in m:
        cards.append(card(f"{noun} (ground truth)", "n_flipped", m["n_flipped"]))
    cards.append(card("dead letters", "dead_letters", m.get("dead_letters")))
    if total is not None:
        cards.append(card("demo wall seconds until the report", "total_seconds", float(total), ".1f"))
    return f'<section id="summary"><div class="cards">{"".join(cards)}</div></section>'


def _lists_answer(norm: str) -> str:
    """The paragraph that says which question the query lists answer under normalisation ``norm``."""
    question, why = LIST_QUESTIONS.get(norm, ("(unknown normalisation)", ""))
    other = ("<code>none</code> (raw influence) answers “which training examples dominate the loss”"
             if norm != "none" else
             "<code>cosine</code> or <code>train_norm</code> answers “why this prediction”")
    return (f'<p class="answers" id="lists-answer" data-normalization="{esc(norm)}" data-question="{esc(question)}">'
            f"<b>These lists answer “{esc(question)}”</b> (normalisation "
            f"{metric('normalization', norm)}): {esc(why)}. Normalisation {other}.</p>")


def _exactness(summary: dict) -> str:
    """What the scores of the lists are: exact (fused job, or the query job's certified rerank) or the sketch's
    estimate of the complement (with its estimated error), from the query job's summary."""
    complement = (summary.get("complement") or {}).get("mode")
    rerank = summary.get("exact_rerank") or {}
    if complement == "exact":
        text, kind = "Scores are exact: the complement uses the full gradients (⟨∇ℓ(z), ∇ℓ(z_test)⟩).", "exact"
    elif complement == "kfac":
        text, kind = ("Scores are exact for the Kronecker-factored (K-FAC) complement: each training gradient "
                      "meets the query's complement vector in full."), "exact"
    elif rerank.get("mode") == "on":
        lists, good = rerank.get("lists", 0), rerank.get("certified_lists", 0)
        kind = "exact" if lists and good == lists else "partly certified"
        which = "the K-FAC complement's" if (summary.get("complement") or {}).get("curvature") == "kfac" else \
            "the exact complement's"
        text = (f"Scores are exact: the index's sketch proposed candidates and their gradients were recomputed and "
                f"scored exactly; {good} of {lists} lists are certified equal to {which} "
                f"({rerank.get('rows_rescored', 0)} candidate rows rescored).")
    elif complement == "sketch":
        err = summary.get("sketch_error") or {}
        kind = "sketch estimate"
        text = ("Scores estimate the complement from the index's gradient sketch"
                + (f" (standard deviation ≈ {err['sigma_median']:.3g} per score, median over queries)"
                   if err.get("sigma_median") is not None else "")
                + ": lists can differ from the exact ones; query with --exact_rerank on and --train_data for exact lists.")
    else:
        return ""
    return f'<p class="exactness" id="lists-exactness" data-exactness="{esc(kind)}">{esc(text)}</p>'


def _queries(res: Results, m: dict, tiles: _Tiles) -> str:
    qids = shown_queries(res.topk, res.inputs.max_queries)
    norm = res.query_summary.get("normalization", "none")
    out = ['<section id="queries"><h2>Which training examples made the model predict this?</h2>',
           f"<p>{metric('n_queries', m['n_queries'])} test examples were queried against "
           f"{metric('index_manifest_rows', m['index_manifest_rows'])} indexed training examples; top "
           f"{metric('top_k', m['top_k'])} proponents and opponents each "
           f"({metric('topk_rows', m['topk_rows'])} result rows, "
           f"{metric('query_dead_letters', m['query_dead_letters'])} bad queries). "
           f"Showing {len(qids)}. "
           + ("Red tiles are training examples whose label was flipped; "
              "their label is the (wrong) one the model was trained on.</p>" if tiles.has_label else
              "Red tiles are noisy training examples (the badge names the kind of noise).</p>"),
           _lists_answer(norm) if res.topk else "", _exactness(res.query_summary) if res.topk else ""]
    if res.topk and tiles.has_label and norm == "none":
        out.append('<p class="muted">A flipped example labelled like the test prediction pushes the model towards it '
                   "(proponent); one that looks like the test digit but carries another label pushes away "
                   "(opponent).</p>")
    if not qids:
        out.append('<p class="muted">No query results given (--query_dir).</p>')
    label_key = res.inputs.label_key
    for qid in qids:
        rec = res.records.get(qid, {})
        if not tiles.has_label:  # no label: the query as text, no true/predicted panel
            out.append(f'<article class="query" id="query-{esc(qid)}" data-query-id="{esc(qid)}">'
                       f'<div class="qhead"><figure class="tile text" data-test-id="{esc(qid)}"><figcaption>'
                       f"<b>{esc(qid)}</b>{tiles.text(qid)}</figcaption></figure></div>")
            _ranked_rows(res, qid, tiles, out, norm)
            continue
        true = rec.get("true_" + label_key, rec.get(label_key))
        pred = res.predictions.get(qid)
        verdict = ""
        if true is not None and pred is not None:
            ok = int(true) == int(pred)
            verdict = f' <span class="{"right" if ok else "wrong"}">{"correct" if ok else "wrong"}</span>'
        out.append(f'<article class="query" id="query-{esc(qid)}" data-query-id="{esc(qid)}">'
                   f'<div class="qhead"><figure class="tile" data-test-id="{esc(qid)}">{img(tiles.png(qid), qid)}'
                   f"<figcaption>{esc(qid)}</figcaption></figure><div><b>{esc(qid)}</b><br>"
                   f'true label <b data-true-label="{esc(_raw(true))}">{esc(fmt(true))}</b>, predicted '
                   f'<b data-predicted-label="{esc(_raw(pred))}">{esc(fmt(pred))}</b>{verdict}</div></div>')
        _ranked_rows(res, qid, tiles, out, norm)
    out.append("</section>")
    return "".join(out)


def _ranked_rows(res: Results, qid: str, tiles: _Tiles, out: list[str], norm: str) -> None:
    """A query's proponent and opponent rows of tiles (each labelled with the question it answers and the
    normalisation), then the end of its article."""
    question = LIST_QUESTIONS.get(norm, ("?", ""))[0]
    for kind, cls, title in ((PROPONENT, "pro", "Proponents — largest influence, most helpful"),
                             (OPPONENT, "opp", "Opponents — most negative influence, most harmful")):
        rows = ranked(res.topk, qid, kind)
        out.append(f'<div class="rowlabel {cls}">{title} · answers “{esc(question)}” · normalisation '
                   f'<code>{esc(norm)}</code></div><div class="row">')
        for r in rows:
            top = f"#{r['rank']} · {r['score']:+.3g}"
            out.append(tiles.train_tile(r["train_id"], esc(top),
                                        {"kind": kind, "rank": r["rank"], "score": r["score"]}))
        out.append("</div>")
    out.append("</article>")


def _audit(res: Results, m: dict, tiles: _Tiles) -> str:
    idx = res.index
    noisy = idx.kinds is not None
    noun = "noisy examples" if noisy else "flipped labels"
    out = ['<section id="audit"><h2>Self-influence audit: which training '
           f'{"examples look noisy" if noisy else "labels look wrong"}?</h2>']
    if idx.flipped is None:
        out.append('<p class="muted">No ground truth of flipped labels (index metadata or --data_meta).</p>')
    else:
        ids = idx.ids.astype(str)
        rows = [[f"top {p}%", f'<td class="num">{metric(f"inspected_at_{p}", m[f"inspected_at_{p}"])}</td>',
                 f'<td class="num">{metric(f"recall_at_{p}", m[f"recall_at_{p}"], "%")}</td>'] for p in (1, 5, 10, 20)]
        score, name, label = audit_score(res)
        source = ("the index's <code>self_influence</code> column plus the complement term from its "
                  "<code>grad_sq_norm</code>, as the audit scored" if name == "complement" else
                  "the index's full <code>self_influence</code> column")
        truncated = (f" Within the top-k eigenspace alone (no complement) the ROC-AUC is "
                     f"{metric('auc_self_influence_only', m.get('auc_self_influence_only'), '.3f')}."
                     if "auc_self_influence_only" in m else "")
        out.append(
            f"<p>The training set holds {metric('n_flipped', m['n_flipped'])} {noun} "
            f"({metric('flipped_fraction', m['flipped_fraction'], '%')}; ground truth from {esc(idx.flipped_source)}). "
            f"Ranking all {metric('n_index_rows', m['n_index_rows'])} indexed examples by "
            f"{metric('audit_score_label', label)} ({source}) finds them with ROC-AUC "
            f"<b>{metric('auc', m['auc'], '.3f')}</b>.{truncated}</p>")
        out.append(table(rows, ["inspect the top", "examples", f"{noun} found"]))
        if noisy and "noise_kinds" in m:
            out.append(_noise_table(m))
        x, y = M.recall_curve(score, idx.flipped, ids=ids)
        marks = {p / 100: m[f"recall_at_{p}"] for p in (1, 5, 10, 20)}
        out.append('<div class="plots">'
                   + img(plots.recall_curve_png(x, y, positive_rate=m["flipped_fraction"], marks=marks, auc=m["auc"]),
                         "share of flipped labels found vs share of the training set inspected", "plot")
                   + img(plots.self_influence_hist_png(score, idx.flipped),
                         "histogram of self-influence, clean vs flipped", "plot") + "</div>")
    n_show = min(len(res.audit), res.inputs.max_suspects)
    out.append(f"<h3>Top {n_show} suspects by {esc(audit_score(res)[2])}</h3>")
    if res.audit:
        out.append(f"<p>Of the top {metric('audit_rows', m['audit_rows'])} written by the audit job, "
                   f"{metric('audit_flipped', m.get('audit_flipped'))} are {'noisy' if noisy else 'flipped'} "
                   f"(precision {metric('audit_precision', m.get('audit_precision'), '%')}).</p>")
        out.append('<div class="row">')
        for r in res.audit[:n_show]:
            top = f"#{r['rank']} · {r['self_influence']:.3g}"
            out.append(tiles.train_tile(r["id"], esc(top), {"rank": r["rank"], "self-influence": r["self_influence"]}))
        out.append("</div>")
    else:
        out.append('<p class="muted">No audit results given (--audit_dir).</p>')
    out.append("</section>")
    return "".join(out)


def _noise_table(m: dict) -> str:
    """ROC-AUC per noise kind (rows: scores; columns: all kinds, then each kind) as ``auc_<score>_<kind>`` metrics."""
    from beam_influence.report.results import NOISE_SCORES

    kinds = ["all", *m["noise_kinds"]]
    head = ["score ranked"] + [f"{esc(k)}" + ("" if k == "all" else f" ({metric('n_noisy_' + k, m['n_noisy_' + k])})")
                               for k in kinds]
    rows = [[esc(label)] + [f'<td class="num">{metric(f"auc_{name}_{k}", m.get(f"auc_{name}_{k}"), ".3f")}</td>'
                            for k in kinds] for name, label in NOISE_SCORES]
    return ('<div id="noise-auc"><h3>ROC-AUC per noise kind</h3><p class="muted">Noisy examples of each kind against '
            "every clean one. The complement adds (‖∇ℓ‖² − ‖P‖²)/ρ, the part of the gradient outside the top-k "
            "eigenspace weighed by 1/ρ (ρ the smallest kept |λ|; needs the index's <code>grad_sq_norm</code>). "
            "The loss alone is the baseline influence has to beat.</p>" + table(rows, head) + "</div>")


def _spectrum(res: Results, m: dict) -> str:
    es = res.eigensystem
    out = ['<section id="spectrum"><h2>The eigensystem: spectrum and quality</h2>']
    if es is None:
        out.append('<p class="muted">No eigensystem file given.</p></section>')
        return "".join(out)
    rel = relative_residuals(es.ritz_values, es.residuals)
    num_params = f"{int(es.args.get('num_params', 0)):,}"
    cum = M.cumulative_capture(es.ritz_values, es.krylov_ritz_values)
    out.append(
        f"<p>Arnoldi built a Krylov space of {metric('krylov_m', m['krylov_m'])} curvature products "
        f"({esc(es.args.get('curvature', 'hessian'))}, p = {esc(num_params)} parameters); "
        f"the top {metric('k', m['k'])} Ritz pairs by |λ| are kept, "
        f"from λ = {metric('lambda_max', m['lambda_max'], '.4g')} "
        f"down to {metric('lambda_min_kept', m['lambda_min_kept'], '.4g')}. They hold "
        f"<b>{metric('capture', m['capture'], '%')}</b> of the Krylov spectrum's |λ| mass. "
        f"{metric('krylov_negatives', m['krylov_negatives'])} Krylov Ritz values are negative (non-convex loss; "
        f"treatment: <code>{esc(es.args.get('negative'))}</code>, damping {esc(es.args.get('damping'))}). "
        f"Residuals ‖Hu − λu‖/|λ|: "
        f"median {metric('median_rel_residual', m.get('median_rel_residual'), '.3g')}, "
        f"max {metric('max_rel_residual', m.get('max_rel_residual'), '.3g')} "
        f"(computed on one fixed batch; a fresh batch per product makes them noisy by design).</p>")
    if not m.get("krylov_consistent", True):
        out.append('<p class="wrong">Warning: the kept Ritz values are not among the Krylov Ritz values stored in '
                   "the eigensystem file, so its <code>krylov_ritz_values</code> are corrupt (a reversed, "
                   "non-contiguous array saved as raw bytes) and the Krylov panel and capture are not shown "
                   "reliably. The kept pairs (λ, eigenvectors, residuals) are unaffected.</p>")
    from beam_influence.core.diagnostics import diagnose  # the eigensystem summary's diagnostics, shown here

    diag = diagnose(es)
    out.append('<p id="eigensystem-diagnostics">' + "<br>".join(esc(line.strip()) for line in diag.lines()
                                                              if not line.strip().startswith("warning:")) + "</p>")
    out += [f'<p class="wrong">Warning: {esc(w)}</p>' for w in diag.warnings]
    out.append(img(plots.spectrum_png(es.ritz_values, es.eigvals, es.residuals, es.krylov_ritz_values, cum),
                   "spectrum", "plot"))
    rows = [[f'<td class="num">{i}</td>', f'<td class="num">{es.ritz_values[i]:.5g}</td>',
             f'<td class="num">{es.eigvals[i]:.5g}</td>', f'<td class="num">{es.residuals[i]:.3g}</td>',
             f'<td class="num">{rel[i]:.3g}</td>', f'<td class="num">{100 * cum[i]:.1f}%</td>'] for i in range(es.k)]
    out.append("<details><summary>Kept Ritz pairs</summary>"
               + table(rows, ["i", "Ritz λ", "λ used in 1/λ", "absolute residual ‖Hu − λu‖",
                              "relative residual ‖Hu − λu‖/|λ|", "cumulative |λ| share"])
               + "</details></section>")
    return "".join(out)


def _json_block(obj: Any) -> str:
    return f"<pre>{esc(json.dumps(obj, indent=1, sort_keys=True, default=str))}</pre>"


def _metadata(res: Results, m: dict) -> str:
    man, run = res.manifest, res.run or {}
    args = man.get("args") or {}
    out = ['<section id="metadata"><h2>Run metadata</h2>']
    out.append(table([
        ["model fingerprint", f"<code>{metric('model_fingerprint', m['model_fingerprint'])}</code>"],
        ["model spec",
         f"<code>{esc(man.get('spec_name'))}</code> ({esc(args.get('spec'))} {esc(args.get('spec_args', ''))})"],
        ["checkpoint", f"<code>{esc(args.get('checkpoint'))}</code>"],
        ["eigensystem",
         f"<code>{metric('eigensystem_id', m['eigensystem_id'])}</code> ({esc(args.get('eigensystem'))})"],
        ["training data", f"<code>{esc(args.get('train_data'))}</code>"],
        ["dead letters (index / queries)",
         f"{metric('dead_letters', m['dead_letters'])} / {esc(m['query_dead_letters'])}"],
    ]))
    stages = run.get("stages") or []
    if stages:
        def cpu(s):
            return "" if s.get("cpu_seconds") is None else f"{s['cpu_seconds']:.1f}"

        rows = [[esc(s["name"]), f'<td class="num">{metric("stage_seconds_" + s["name"], s["seconds"], ".1f")}</td>',
                 f'<td class="num">{cpu(s)}</td>', esc(s.get("in", "")), esc(s.get("out", ""))] for s in stages]
        if run.get("total_seconds") is not None:
            rows.append(["<b>total until the report</b>",
                         f'<td class="num"><b>{metric("total_seconds", float(run["total_seconds"]), ".1f")}</b></td>',
                         "", "", ""])
        out.append("<h3>Stages: time, counts in and out</h3>"
                   "<p class=\"muted\">Wall seconds; CPU seconds of this process and of finished child processes "
                   "(Beam workers). Wall ≫ CPU means the machine was busy with other work.</p>"
                   + table(rows, ["stage", "wall s", "CPU s", "in", "out"])
                   + img(plots.stage_times_png(stages), "seconds per stage", "plot"))
    counts = [["index: records read", esc(man.get("records", "n/a"))],
              ["index: examples projected", esc((man.get("counters") or {}).get("examples_projected", "n/a"))],
              ["index: rows written", esc(man.get("rows"))],
              ["index: dead letters", esc(man.get("dead_letters"))],
              ["index pipeline seconds", esc(f"{man.get('seconds', float('nan')):.1f}")]]
    if res.query_summary:
        counts += [["query: top-k rows", esc(res.query_summary.get("topk_rows"))],
                   ["query pipeline seconds", esc(f"{res.query_summary.get('seconds', float('nan')):.1f}")]]
    if res.audit_summary:
        counts += [["audit: rows written", esc(res.audit_summary.get("rows_written"))],
                   ["audit pipeline seconds", esc(f"{res.audit_summary.get('seconds', float('nan')):.1f}")]]
    out.append("<h3>Pipeline counts</h3>" + table(counts))
    if run.get("args"):
        out.append("<h3>Demo arguments</h3>" + _json_block(run["args"]))
    out.append("<h3>Index arguments</h3>" + _json_block(args))
    if res.eigensystem is not None:
        out.append("<h3>Eigensystem arguments</h3>" + _json_block(dict(res.eigensystem.args)))
    if run.get("environment"):
        out.append("<h3>Environment</h3>" + _json_block(run["environment"]))
    out.append("</section>")
    return "".join(out)


def render(res: Results, m: dict | None = None) -> str:
    """The whole page as a string."""
    m = compute_metrics(res) if m is None else m
    tiles = _Tiles(res)
    title = f"beam-influence report — {res.manifest.get('spec_name', 'model')}"
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="muted">Generated {esc(when)} from the result files in <code>{esc(res.inputs.index_dir)}</code>'
        f"{', ' + esc(res.inputs.query_dir) if res.inputs.query_dir else ''}"
        f"{', ' + esc(res.inputs.audit_dir) if res.inputs.audit_dir else ''}.</p>",
        '<nav><a href="#queries">Queries</a><a href="#audit">Self-influence audit</a>'
        '<a href="#spectrum">Spectrum</a><a href="#metadata">Run metadata</a></nav>',
        _summary(res, m),
        f'<section id="sign-convention" class="note"><b>Sign convention.</b> {SIGN_CONVENTION}</section>',
        _queries(res, m, tiles), _audit(res, m, tiles), _spectrum(res, m), _metadata(res, m),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(body)}</main></body></html>\n")


def build_report(inputs: ReportInputs, out_path: str) -> dict:
    """Load the result files, render the page, write it to ``out_path``; returns the metrics shown."""
    from beam_influence.util import write_text

    res = load_results(inputs)
    m = compute_metrics(res)
    write_text(out_path, render(res, m))
    return m
