"""The demo's HTML report, opened in a real browser (headless Chromium driven over the DevTools protocol).

The ``browser`` tests run ``pipelines.demo --fast`` once per session into a temporary directory, open
``report.html`` from a file:// URL and check that every image loads, every section is there, the page
makes no network request, and that every number it shows equals the value recomputed here from the
result files (index Parquet, topk.jsonl, self_influence_top.jsonl, eigensystem, run.json), not from the
report code. A full-page screenshot is saved in the test's tmp dir.

Chromium comes from Debian (``apt-get install chromium``; ``make test`` installs it via mk/browser.mk).
The DevTools protocol runs over a pipe (``--remote-debugging-pipe``: NUL-terminated JSON on fds 3/4),
so no websocket client or Playwright download is needed.
"""
from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from beam_influence.report import metrics as M

CHROMIUM = os.environ.get("BROWSER_BIN", "/usr/bin/chromium")
SECTIONS = ("summary", "sign-convention", "queries", "audit", "spectrum", "metadata")


# ---- pure metric functions (fast, no browser) -----------------------------------------------------------
def test_roc_auc_matches_mann_whitney_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    labels = rng.random(300) < 0.2
    assert M.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.roc_auc([1.0, 2.0], [True, False]) == 0.0
    assert math.isnan(M.roc_auc([1.0, 2.0], [True, True]))


def test_recall_at_fractions_inspects_ceil_and_breaks_ties_by_id():
    scores = [5.0, 4.0, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    flipped = [True, False, True, False, False, False, False, False, False, True]
    ids = ["a", "c", "b", "d", "e", "f", "g", "h", "i", "j"]  # "b" (flipped) ties with "c" and wins
    r = M.recall_at_fractions(scores, flipped, ids=ids, fractions=(0.1, 0.2, 0.25, 1.0))
    assert r == {0.1: 1 / 3, 0.2: 2 / 3, 0.25: 2 / 3, 1.0: 1.0}
    assert M.num_inspected(0.01, 1438) == 15 and M.num_inspected(0.2, 10) == 2
    x, y = M.recall_curve(scores, flipped, ids=ids)
    assert x[0] == 0 and y[0] == 0 and x[-1] == 1 and y[-1] == 1 and np.all(np.diff(y) >= 0)


def test_spectrum_capture():
    assert M.spectrum_capture([4.0, -2.0], [4.0, -2.0, 1.0, 1.0]) == pytest.approx(0.75)
    np.testing.assert_allclose(M.cumulative_capture([4.0, -2.0], [4.0, -2.0, 1.0, 1.0]), [0.5, 0.75])
    assert M.krylov_consistent([4.0, -2.0], [4.0, 1.0, -2.0 * (1 + 1e-9)])
    assert not M.krylov_consistent([4.0, -2.0], [4.0, 1e-321, 0.0])  # a corrupt (garbage) Krylov array


# ---- Chromium over the DevTools protocol (pipe transport) ----------------------------------------------
class Chromium:
    """A headless Chromium with ``--remote-debugging-pipe``: ``send(method, params, session)`` → result."""

    def __init__(self, profile_dir: Path, *, timeout: float = 60.0):
        self.timeout, self.next_id, self.buf, self.events = timeout, 0, b"", []
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. bash moves the pipe ends there (from
        # copies at fds >= 100, so nothing collides); no preexec_fn, so no fork of this multithreaded process.
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 100)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 100)
        redirect = f'exec "$@" 3<&{hi_r} 4>&{hi_w} {hi_r}<&- {hi_w}>&-'
        cmd = ["/bin/bash", "-c", redirect, "chromium", CHROMIUM,
               "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-extensions", "--no-first-run", "--no-default-browser-check", "--mute-audio",
               f"--user-data-dir={profile_dir}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(hi_r, hi_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (to_chrome_r, from_chrome_w, hi_r, hi_w):
            os.close(fd)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (rc={self.proc.poll()})")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict:
        deadline = time.time() + self.timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method and ev.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def evaluate(self, expression: str, session: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"]["value"]

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_chrome)
        os.close(self.from_chrome)


# ---- the demo, once per session --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from pipelines import demo

    out = tmp_path_factory.mktemp("demo")
    # the small MLP compiles in a third of the CNN's time; no persistent XLA cache leaks into the session
    demo.run(["--output", str(out), "--fast", "--spec", "beam_influence.models.digits:mlp", "--no_compilation_cache"])
    assert (out / "report.html").is_file()
    return out


def _open_report(report: Path, tmp_path_factory):
    """Chromium with ``report`` loaded: yields (browser, session id, network request URLs)."""
    if not (shutil.which(CHROMIUM) or os.path.exists(CHROMIUM)):
        pytest.skip(f"{CHROMIUM} not found: `apt-get install chromium` (make test does it via mk/browser.mk)")
    browser = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
        browser.send("Page.navigate", {"url": report.as_uri()}, session)
        browser.wait_event("Page.loadEventFired", session)
        urls = [ev["params"]["request"]["url"] for ev in browser.events
                if ev.get("method") == "Network.requestWillBeSent"]
        yield browser, session, urls
    finally:
        browser.close()


@pytest.fixture(scope="session")
def page(demo_dir, tmp_path_factory):
    """The report loaded in Chromium: (browser, session id, network request URLs)."""
    yield from _open_report(demo_dir / "report.html", tmp_path_factory)


def dom_metrics(browser, session) -> list[dict]:
    return browser.evaluate(
        "[...document.querySelectorAll('[data-metric]')].map(e => ({name: e.dataset.metric, "
        "value: e.dataset.value, text: e.textContent.trim()}))", session)


def metric_values(items: list[dict]) -> dict[str, str]:
    """name → raw value; every repeat of a name must show the same value."""
    out: dict[str, str] = {}
    for it in items:
        assert out.setdefault(it["name"], it["value"]) == it["value"], f"{it['name']} shown with two values"
    return out


@pytest.mark.browser
def test_report_renders_every_image_and_section_offline(page, tmp_path):
    browser, session, urls = page
    state = browser.evaluate(
        "({ready: document.readyState, images: document.images.length,"
        " broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),"
        " sections: [...document.querySelectorAll('section[id]')].map(s => s.id),"
        " scripts: document.scripts.length, queries: document.querySelectorAll('article.query').length,"
        " flippedTiles: document.querySelectorAll('figure.tile.flipped').length})", session)
    assert state["ready"] == "complete"
    assert state["broken"] == [] and state["images"] > 50
    assert set(SECTIONS) <= set(state["sections"])
    assert state["scripts"] == 0 and state["queries"] >= 5 and state["flippedTiles"] > 0
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls  # readable offline
    shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session)
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


# ---- the numbers, recomputed from the files --------------------------------------------------------------
def index_table(index_dir: Path):
    """The index rows through its manifest (shards verified); ``flipped`` travels as a record-field column."""
    from beam_influence.beam.index import read_index_table

    t = read_index_table(str(index_dir))
    ids = np.asarray(t.column("id").to_pylist())
    si = t.column("self_influence").to_numpy()
    return ids, si, np.asarray(t.column("flipped").to_pylist()), np.asarray(t.column("label").to_pylist())


def audit_scores(demo_dir: Path, si: np.ndarray) -> np.ndarray:
    """The score the self-influence audit ranked by: self-influence, plus the exact complement term
    (‖∇ℓ‖² − ‖P‖²)/ρ when its summary says so (the report's headline uses the same score)."""
    summary = json.loads((demo_dir / "audit" / "self_influence_summary.json").read_text())
    term = summary.get("complement") or {}
    if term.get("mode") in (None, "none"):
        return si
    from beam_influence.beam.index import read_index_table

    t = read_index_table(str(demo_dir / "index"))
    p = np.asarray(t.column("projection").to_pylist(), np.float64)
    return si + (t.column("grad_sq_norm").to_numpy() - (p ** 2).sum(1)) / term["rho"]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.browser
def test_report_numbers_equal_the_result_files(page, demo_dir):
    from sklearn.metrics import roc_auc_score

    from beam_influence.core.eigensystem import Eigensystem

    browser, session, _ = page
    items = dom_metrics(browser, session)
    shown = metric_values(items)
    ids, si, flipped, _ = index_table(demo_dir / "index")
    meta = json.loads((demo_dir / "data" / "digits_meta.json").read_text())
    assert set(ids[flipped]) == set(meta["flipped_ids"])

    # mislabel detection over the whole index, by the audit's own score (with the complement when it is on)
    score = audit_scores(demo_dir, si)
    assert float(shown["auc"]) == pytest.approx(roc_auc_score(flipped, score), abs=1e-9)
    order = sorted(range(len(ids)), key=lambda i: (-score[i], ids[i]))
    for pct in (1, 5, 10, 20):
        n = math.ceil(pct / 100 * len(ids))
        assert int(shown[f"inspected_at_{pct}"]) == n
        assert float(shown[f"recall_at_{pct}"]) == pytest.approx(flipped[order[:n]].sum() / flipped.sum(), abs=1e-12)
    assert int(shown["n_index_rows"]) == len(ids) == meta["n_train"]
    assert int(shown["n_flipped"]) == int(flipped.sum()) == len(meta["flipped_ids"])
    manifest = json.loads((demo_dir / "index" / "manifest.json").read_text())
    dead = (demo_dir / "index" / manifest["dead_letter_file"]).read_text().strip()
    assert int(shown["dead_letters"]) == (len(dead.splitlines()) if dead else 0)

    # the text shown is the value, rounded
    texts = {it["name"]: it["text"] for it in items}
    assert texts["auc"] == f"{float(shown['auc']):.3f}"
    assert texts["recall_at_10"] == f"{100 * float(shown['recall_at_10']):.1f}%"

    # spectrum
    es = Eigensystem.load(str(demo_dir / "model" / "eigensystem.safetensors"))
    assert int(shown["k"]) == es.k and int(shown["krylov_m"]) == len(es.krylov_ritz_values)
    assert float(shown["lambda_max"]) == pytest.approx(es.ritz_values[0])
    capture = np.abs(es.ritz_values).sum() / np.abs(es.krylov_ritz_values).sum()
    assert float(shown["capture"]) == pytest.approx(capture) and 0 < capture <= 1

    # run metadata
    run = json.loads((demo_dir / "run.json").read_text())
    assert shown["model_fingerprint"] == run["model"]["fingerprint"]
    assert float(shown["test_accuracy"]) == pytest.approx(run["model"]["test_accuracy"])
    for stage in run["stages"]:
        if stage["name"] != "report":
            assert float(shown[f"stage_seconds_{stage['name']}"]) == pytest.approx(stage["seconds"])
    assert run["auc"] == pytest.approx(float(shown["auc"]))


@pytest.mark.browser
def test_report_tiles_equal_topk_and_audit_rows(page, demo_dir):
    browser, session, _ = page
    ids, si, flipped, labels = index_table(demo_dir / "index")
    by_id = {i: (bool(f), int(lab), s) for i, f, lab, s in zip(ids, flipped, labels, si)}
    tiles = browser.evaluate(
        "[...document.querySelectorAll('#queries article.query')].map(a => ({q: a.dataset.queryId, tiles: "
        "[...a.querySelectorAll('figure[data-train-id]')].map(f => ({id: f.dataset.trainId, kind: f.dataset.kind, "
        "rank: +f.dataset.rank, score: +f.dataset.score, flipped: f.dataset.flipped === 'true', "
        "red: f.classList.contains('flipped'), text: f.textContent}))}))", session)
    rows = jsonl(demo_dir / "query" / "topk.jsonl")
    assert {t["q"] for t in tiles} == {r["query_id"] for r in rows}
    for article in tiles:
        want = sorted((r for r in rows if r["query_id"] == article["q"]), key=lambda r: (r["kind"], r["rank"]))
        got = sorted(article["tiles"], key=lambda t: (t["kind"], t["rank"]))
        assert [(t["id"], t["kind"], t["rank"]) for t in got] == [(r["train_id"], r["kind"], r["rank"]) for r in want]
        for t, r in zip(got, want):
            assert t["score"] == pytest.approx(r["score"], rel=1e-12)
            assert t["flipped"] == t["red"] == by_id[t["id"]][0]
            assert f"label {by_id[t['id']][1]}" in t["text"]
            assert ("FLIPPED" in t["text"]) == t["flipped"]
        pro = [r["score"] for r in want if r["kind"] == "proponent"]
        opp = [r["score"] for r in want if r["kind"] == "opponent"]
        assert pro == sorted(pro, reverse=True) and opp == sorted(opp) and pro[0] > opp[0]

    audit = browser.evaluate(
        "[...document.querySelectorAll('#audit figure[data-train-id]')].map(f => ({id: f.dataset.trainId, "
        "rank: +f.dataset.rank, si: +f.dataset.selfInfluence, flipped: f.dataset.flipped === 'true'}))", session)
    top = jsonl(demo_dir / "audit" / "self_influence_top.jsonl")
    assert audit and [(a["id"], a["rank"]) for a in audit] == [(r["id"], r["rank"]) for r in top[: len(audit)]]
    # the audit ranks by self-influence, plus the exact complement term (‖∇ℓ‖² − ‖P‖²)/ρ when its summary says so
    score = audit_scores(demo_dir, si)
    by_score = dict(zip(ids, score))
    for a in audit:
        assert a["si"] == pytest.approx(by_score[a["id"]], rel=1e-6) and a["flipped"] == by_id[a["id"]][0]
    # the audit's top-N is the top-N of that score over the whole index
    best = sorted(zip(-score, ids))[: len(top)]
    assert [r["id"] for r in top] == [i for _, i in best]


# ---- the translation demo's report (token sequences, no label) ---------------------------------------
@pytest.fixture(scope="session")
def seq_demo_dir(tmp_path_factory) -> Path:
    from pipelines import demo

    out = tmp_path_factory.mktemp("seq_demo")
    demo.run(["--task", "translation", "--output", str(out), "--fast", "--no_compilation_cache"])
    assert (out / "report.html").is_file()
    return out


@pytest.fixture(scope="session")
def seq_page(seq_demo_dir, tmp_path_factory):
    yield from _open_report(seq_demo_dir / "report.html", tmp_path_factory)


@pytest.mark.browser
def test_translation_report_shows_text_noise_kinds_and_no_label_panels(seq_page, seq_demo_dir):
    from beam_influence.beam.index import read_index_table
    from beam_influence.formats import read_records
    from beam_influence.models.sequence import detokenize

    browser, session, urls = seq_page
    state = browser.evaluate(
        "({sections: [...document.querySelectorAll('section[id]')].map(s => s.id),"
        " broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),"
        " queries: document.querySelectorAll('article.query').length, scripts: document.scripts.length,"
        " trueLabels: document.querySelectorAll('[data-true-label]').length, body: document.body.innerText,"
        " noiseTable: !!document.querySelector('#noise-auc table'),"
        " tiles: [...document.querySelectorAll('figure[data-train-id]')].map(f => ({id: f.dataset.trainId,"
        "   noise: f.dataset.noise, red: f.classList.contains('flipped'), text: f.innerText,"
        "   seq: [...f.querySelectorAll('.seq')].map(e => [e.firstChild.textContent,"
        "                                              e.childNodes.length > 1 ? e.lastChild.textContent : ''])}))})",
        session)
    assert set(SECTIONS) <= set(state["sections"]) and state["noiseTable"]
    assert state["broken"] == [] and state["scripts"] == 0 and state["queries"] >= 5
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    assert state["trueLabels"] == 0 and "label -1" not in state["body"] and "FLIPPED" not in state["body"]
    t = read_index_table(str(seq_demo_dir / "index"))
    noise = dict(zip(t.column("id").to_pylist(), t.column("noise").to_pylist()))
    records = {r["id"]: r for r in read_records(str(seq_demo_dir / "data" / "train-*.parquet"))}
    assert state["tiles"]
    for tile in state["tiles"]:
        kind = noise[tile["id"]]
        assert tile["noise"] == kind and tile["red"] == (kind != "clean")
        assert (f"NOISY · {kind}" in tile["text"]) == (kind != "clean")
        rec = records[tile["id"]]  # the text shown is the record's tokens, detokenized
        assert tile["seq"] == [["source", detokenize(rec["src"])], ["target", detokenize(rec["tgt"])]]


@pytest.mark.browser
def test_translation_report_auc_per_noise_kind_equals_the_index(seq_page, seq_demo_dir):
    from sklearn.metrics import roc_auc_score

    from beam_influence.beam.index import read_index_table
    from beam_influence.core.eigensystem import Eigensystem

    browser, session, _ = seq_page
    shown = metric_values(dom_metrics(browser, session))
    t = read_index_table(str(seq_demo_dir / "index"))
    kinds = np.asarray(t.column("noise").to_pylist())
    noisy = kinds != "clean"
    proj = np.asarray(t.column("projection").to_pylist(), np.float64)
    lam = Eigensystem.load(str(seq_demo_dir / "model" / "eigensystem.safetensors")).eigvals
    si = t.column("self_influence").to_numpy()
    assert si == pytest.approx((proj ** 2 / lam).sum(1), rel=1e-5)
    comp = si + (t.column("grad_sq_norm").to_numpy() - (proj ** 2).sum(1)) / np.abs(lam).min()
    scores = {"self_influence": si, "complement": comp, "loss": t.column("loss").to_numpy()}
    meta = json.loads((seq_demo_dir / "data" / "translation_meta.json").read_text())
    assert set(np.asarray(t.column("id").to_pylist())[noisy]) == set(meta["noisy_ids"])
    for kind in ["all", *sorted(set(kinds[noisy]))]:
        pos = noisy if kind == "all" else kinds == kind
        sel = pos | ~noisy
        for name, s in scores.items():
            want = roc_auc_score(pos[sel], s[sel])
            assert float(shown[f"auc_{name}_{kind}"]) == pytest.approx(want, abs=1e-6), (name, kind)
    assert float(shown["auc"]) == pytest.approx(roc_auc_score(noisy, audit_scores(seq_demo_dir, si)), abs=1e-9)
    run = json.loads((seq_demo_dir / "run.json").read_text())
    assert run["auc_by_kind"]["auc_self_influence_all"] == pytest.approx(float(shown["auc_self_influence_all"]))
