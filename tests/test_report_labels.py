"""The report's numbers and labels, without a browser: the headline uses the audit's own score (with the complement
when the audit scored with it) and says which; the query lists say which question they answer under their
normalisation; the eigensystem table labels its absolute and relative residual columns."""
import html
import re

import numpy as np
import pytest

from beam_influence.core.eigensystem import Eigensystem
from beam_influence.core.scoring import LIST_QUESTIONS, NORMALIZATIONS, list_question
from beam_influence.report import compute_metrics, render
from beam_influence.report.results import IndexColumns, ReportInputs, Results


def _results(*, audit_complement: bool, normalization: str = "none", eigensystem=None) -> Results:
    rng = np.random.default_rng(0)
    n = 40
    ids = np.asarray([f"tr-{i:03d}" for i in range(n)], dtype=object)
    flipped = np.zeros(n, bool)
    flipped[:8] = True
    si = rng.uniform(0, 1, n) + 0.3 * flipped
    comp = si + rng.uniform(0, 1, n) + 1.0 * flipped  # the complement separates flipped labels better here
    idx = IndexColumns(ids=ids, self_influence=si, loss=rng.uniform(0, 1, n), label=np.zeros(n, np.int64),
                       flipped=flipped, true_label=np.full(n, -1, np.int64), flipped_source="test", complement=comp)
    topk = [{"query_id": "q0", "train_id": str(ids[r]), "kind": kind, "rank": r + 1, "score": float(s)}
            for kind, s0 in (("proponent", 1.0), ("opponent", -1.0)) for r, s in enumerate([s0, s0 / 2])]
    term = {"mode": "exact", "rho": 0.25} if audit_complement else {"mode": "none"}
    score = comp if audit_complement else si
    audit = [{"id": str(ids[i]), "rank": r + 1, "self_influence": float(score[i])}
             for r, i in enumerate(np.argsort(-score)[:5])]
    return Results(inputs=ReportInputs(index_dir="idx", query_dir="q", audit_dir="a"),
                   manifest={"rows": n, "records": n + 1, "dead_letters": 1, "counters": {"records_read": n + 1}},
                   index=idx, topk=topk, query_summary={"normalization": normalization, "top_k": 2},
                   audit=audit, audit_summary={"complement": term}, eigensystem=eigensystem, meta={}, run={},
                   records={}, predictions={}, test_accuracy=None)


def _metric(page: str, name: str) -> str:
    """The raw value of the page's first ``data-metric=name`` element."""
    m = re.search(rf'data-metric="{name}" data-value="([^"]*)"', page)
    assert m, f"{name} not on the page"
    return html.unescape(m.group(1))


def _roc_auc(scores, positives):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(positives, scores)


@pytest.mark.parametrize("audit_complement", [True, False])
def test_headline_uses_the_audits_score_and_says_which(audit_complement):
    res = _results(audit_complement=audit_complement)
    m = compute_metrics(res)
    want = res.index.complement if audit_complement else res.index.self_influence
    assert m["auc"] == pytest.approx(_roc_auc(want, res.index.flipped))
    assert m["audit_score"] == ("complement" if audit_complement else "self_influence")
    page = render(res, m)
    summary = page[page.index('<section id="summary">'):page.index("</section>")]
    if audit_complement:
        assert m["auc"] != pytest.approx(_roc_auc(res.index.self_influence, res.index.flipped))
        assert m["auc_self_influence_only"] == pytest.approx(_roc_auc(res.index.self_influence, res.index.flipped))
        assert "self-influence + complement (ρ = 0.25)" in summary
        assert float(_metric(page, "auc_self_influence_only")) == m["auc_self_influence_only"]
    else:
        assert "auc_self_influence_only" not in m
        assert "self-influence (top-k eigenspace only)" in summary
    assert float(_metric(page, "auc")) == m["auc"]
    assert _metric(page, "audit_score_label") == m["audit_score_label"]
    # recall is ranked by the same score, so the audit's own top-N and the headline agree
    order = sorted(range(len(want)), key=lambda i: (-want[i], res.index.ids[i]))
    assert m["recall_at_10"] == pytest.approx(res.index.flipped[order[:4]].sum() / res.index.flipped.sum())


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_query_lists_say_which_question_they_answer(normalization):
    res = _results(audit_complement=False, normalization=normalization)
    page = render(res)
    question = list_question(normalization)[0]
    assert question == ("which training examples dominate the loss" if normalization == "none"
                        else "why this prediction")
    assert f'data-normalization="{normalization}" data-question="{question}"' in page
    assert _metric(page, "normalization") == normalization
    assert compute_metrics(res)["lists_answer"] == question
    rowlabels = re.findall(r'<div class="rowlabel (?:pro|opp)">([^<]*(?:<code>[^<]*</code>)?)</div>', page)
    assert len(rowlabels) == 2
    for label in rowlabels:
        assert f"answers “{question}”" in label and f"<code>{normalization}</code>" in label
    with pytest.raises(ValueError, match="normalization"):
        list_question("l2")
    assert set(LIST_QUESTIONS) == set(NORMALIZATIONS)


def test_residual_columns_are_labelled_absolute_and_relative():
    ritz = np.array([4.0, 2.0, 0.5])
    residuals = np.array([0.4, 0.1, 0.25])
    es = Eigensystem(eigvals=ritz, ritz_values=ritz, residuals=residuals, eigvecs={"w": np.eye(3, dtype=np.float32)},
                     krylov_ritz_values=np.array([4.0, 2.0, 0.5, 0.1]), fingerprint="f", spec_name="s",
                     args={"num_params": 3})
    page = render(_results(audit_complement=False, eigensystem=es))
    assert "<th>absolute residual ‖Hu − λu‖</th><th>relative residual ‖Hu − λu‖/|λ|</th>" in page
    start = page.index("<summary>Kept Ritz pairs</summary>")
    table = page[start:page.index("</details>", start)]
    rows = re.findall(r"<tr>((?:<td[^>]*>[^<]*</td>)+)</tr>", table)
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in rows]
    assert [float(c[3]) for c in cells] == pytest.approx(residuals, rel=1e-3)
    assert [float(c[4]) for c in cells] == pytest.approx(residuals / ritz, rel=1e-3)


def test_records_read_comes_from_the_manifest():
    """The index's records read is the manifest's verified count (there is no ``records`` counter)."""
    page = render(_results(audit_complement=False))
    assert "<td>index: records read</td><td>41</td>" in page


@pytest.mark.parametrize("summary, kind", [
    ({"complement": {"mode": "exact"}}, "exact"),
    ({"complement": {"mode": "kfac"}}, "exact"),
    ({"complement": {"mode": "sketch"}, "exact_rerank": {"mode": "on", "lists": 4, "certified_lists": 4}}, "exact"),
    ({"complement": {"mode": "sketch"}, "exact_rerank": {"mode": "on", "lists": 4, "certified_lists": 3}},
     "partly certified"),
    ({"complement": {"mode": "sketch"}, "exact_rerank": {"mode": "off"}, "sketch_error": {"sigma_median": 0.1}},
     "sketch estimate"),
    ({"complement": {"mode": "sketch", "curvature": "kfac"}, "exact_rerank": {"mode": "on", "lists": 4,
                                                                           "certified_lists": 4}}, "exact"),
    ({"complement": {"mode": "sketch", "curvature": "kfac"}, "exact_rerank": {"mode": "off"},
      "sketch_error": {"sigma_median": 0.1}}, "sketch estimate"),
])
def test_query_lists_say_whether_their_scores_are_exact(summary, kind):
    res = _results(audit_complement=False, normalization="none")
    res.query_summary.update(summary)
    page = render(res)
    assert f'data-exactness="{kind}"' in page
    if summary["complement"].get("curvature") == "kfac" and kind == "exact":  # a K-FAC index, reranked
        assert "the K-FAC complement&#x27;s" in page
    if kind == "sketch estimate":
        assert "standard deviation ≈ 0.1" in page and "--exact_rerank on" in page
