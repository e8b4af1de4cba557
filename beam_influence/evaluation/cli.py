"""``beam-influence evaluate``: measure attribution quality of every method on one model, as a command.

For a model spec and a dataset (``--data pkg.module:factory``, default scikit-learn's digits; a
training function ``--train-fn pkg.module:train``, default ``beam_influence.train:train``; contracts in
``beam_influence.evaluation.loading``) it

1. trains the base model (``--steps``/``--learning-rate``/``--batch-size``, init ``spec.init(seed)``)
   on the clean training split and picks ``--queries`` test examples;
2. retrains it on ``--num-subsets`` random halves of the training set through Beam (one element per
   subset; ``--runner`` and any other Beam flag are passed through; default FnApiRunner) and
   records minus the test loss of each retrained model (cached under ``--retrain-cache``);
3. fits every method of ``--methods`` and reports its **LDS** (Spearman of summed scores vs the
   retrained test losses, mean over queries), its **agreement with exact influence** (Spearman and
   top-k overlap per query, when the dense Hessian fits: p <= ``--max-exact-params``) and its time;
4. with ``--label-noise`` > 0, trains a second model on noisy labels (``--noise``: ``uniform`` flips,
   a systematic ``swap`` between the two most similar classes, conflicting near-``duplicates``, flips of
   the most ``atypical`` inputs, or ``atypical+ambiguous`` — those flips among clean but ambiguous blends,
   the benchmark where the loss alone misses the noisy examples (docs/quality.md);
   ``beam_influence.evaluation.noise``) and reports the **mislabel ROC-AUC** of each method's
   self-influence ranking, always beside the two baselines that need no influence: the training
   loss and the gradient norm ‖∇ℓ(z)‖²;
5. prints a table, writes JSON (``--out``) and a markdown table (``--markdown``, default ``<out>.md``).

The Arnoldi methods use the library's ``EigensystemArgs`` defaults (k, n, sample size, a fixed
sample) unless ``--top-k``/``--num-iters``/``--sample-size``/``--fresh-batches`` say otherwise;
``ideal_complement`` is the complement on the ideal top-k eigenvectors at the same k (dense Hessian,
or a converged reference Arnoldi), the target ``arnoldi_complement`` is measured against.

Sign convention: scores estimate ∇ℓ_test^T H^{-1} ∇ℓ_train (larger = more helpful), H the Hessian of
mean loss + l2/2 ‖θ‖².
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from beam_influence.cli_args import add_spec_args, spec_kwargs
from beam_influence.evaluation import METHOD_NAMES
from beam_influence.evaluation.noise import NOISE_KINDS
from beam_influence.util import exists, jsonable, machine_info, read_json, write_json, write_text

DEFAULT_METHODS = "arnoldi,arnoldi_complement,ideal_complement,exact,cg,lissa,tracin"
BASELINES = ("loss", "grad_norm")  # mislabel baselines: rank by ℓ(z), by ‖∇ℓ(z)‖²


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """Every argument of an evaluation (saved in the JSON result; a rerun with others refuses to overwrite)."""

    spec: str
    spec_args: dict
    methods: tuple[str, ...]
    num_subsets: int = 50
    subset_fraction: float = 0.5
    queries: int = 100
    steps: int = 1500
    learning_rate: float = 1e-2
    batch_size: int | None = None
    test_fraction: float = 0.2
    label_noise: float = 0.1
    seed: int = 0
    top_k: int | None = None  # None: EigensystemArgs().top_k
    num_iters: int | None = None  # None: EigensystemArgs().num_iters
    sample_size: int | None = None  # None: EigensystemArgs().sample_size
    fresh_batches: bool = False
    eigvecs: str = "arnoldi"
    negative: str = "abs"
    rho: float | None = None
    curvature_batch_size: int | None = None
    cg_tol: float = 1e-5
    cg_max_iters: int = 500
    cg_damping: float = 0.0
    lissa_depth: int = 1000
    lissa_scale: float | None = None
    lissa_damping: float = 0.0
    lissa_batch_size: int | None = None
    exact_damping: float = 0.0
    exact_negative: str = "keep"
    max_exact_params: int = 12_000
    agreement_k: int = 10
    self_influence_max: int = 300
    data: str = "beam_influence.models.digits:load_digits"
    train_fn: str = "beam_influence.train:train"
    noise: str = "uniform"

    def __post_init__(self):
        from beam_influence.evaluation.noise import NOISE_KINDS

        if self.noise not in NOISE_KINDS:
            raise ValueError(f"--noise must be one of {', '.join(NOISE_KINDS)}, got {self.noise!r}")
        bad = [m for m in self.methods if m not in METHOD_NAMES]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHOD_NAMES)}")
        if self.num_subsets < 3:
            raise ValueError(f"--num-subsets must be >= 3 (Spearman over subsets), got {self.num_subsets}")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"--label-noise must be in [0, 1), got {self.label_noise}")
        if self.queries < 1:
            raise ValueError(f"--queries must be >= 1, got {self.queries}")

    def method_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments of ``make_method(name, ...)``."""
        if name in ("arnoldi", "arnoldi_complement", "ideal_complement"):
            opts = dict(top_k=self.top_k, num_iters=self.num_iters, rho=self.rho, negative=self.negative,
                        seed=self.seed, sample_size=self.sample_size, fresh_batches=self.fresh_batches)
            if name == "ideal_complement":
                return dict(opts, max_exact_params=self.max_exact_params)
            return dict(opts, eigvecs=self.eigvecs)
        if name == "exact":
            return dict(damping=self.exact_damping, negative=self.exact_negative, max_params=self.max_exact_params)
        if name == "cg":
            return dict(tol=self.cg_tol, max_iters=self.cg_max_iters, damping=self.cg_damping, seed=self.seed)
        if name == "lissa":
            return dict(depth=self.lissa_depth, scale=self.lissa_scale, damping=self.lissa_damping,
                        batch_size=self.lissa_batch_size, seed=self.seed)
        return {}


# ---- the evaluation (library code: no flags read here) -------------------------------------------
def _decode(spec, records):
    return spec.stack([spec.decode(r) for r in records])


def _train_fn(a: EvalArgs):
    from beam_influence.evaluation.loading import load_callable

    return load_callable(a.train_fn, what="training function (--train-fn)")


def _accuracy(spec, params, batch) -> float | None:
    """Test accuracy (argmax of ``spec.apply`` against the label), None when the spec has no ``apply``."""
    import jax

    if spec.apply is None or spec.label_key is None or spec.label_key not in batch:
        return None
    out = jax.vmap(spec.apply, in_axes=(None, 0))(params, batch)
    if not hasattr(out, "ndim") or out.ndim != 2:
        return None
    return float(np.mean(np.asarray(out).argmax(-1) == np.asarray(batch[spec.label_key])))


def _train_task(spec, a: EvalArgs, data, query_idx, *, progress: bool):
    from beam_influence.evaluation.methods import Task

    train = _train_fn(a)
    train_batch = _decode(spec, data.train)
    test_batch = {k: v[query_idx] for k, v in _decode(spec, data.test).items()}
    t0 = time.perf_counter()
    params = train(spec, train_batch, steps=a.steps, learning_rate=a.learning_rate, batch_size=a.batch_size,
                   seed=a.seed)
    seconds = time.perf_counter() - t0
    task = Task(spec, params, train_batch, test_batch, curvature_batch_size=a.curvature_batch_size, progress=progress)
    info = dict(n_train=task.n_train, n_queries=task.n_test, num_params=task.num_params, train_seconds=seconds,
                objective=float(spec.batch_loss(params, train_batch)),
                test_accuracy=_accuracy(spec, params, _decode(spec, data.test)))
    return task, info


def lds_setup(a: EvalArgs, *, pipeline_args: Sequence[str] | None = None, retrain_cache: str | None = None,
              progress: bool = True, log=print):
    """The LDS task of ``evaluate``: ``(spec, task, info, masks, targets, retraining info)`` — the base
    model trained on the clean split, the query set, and the retraining targets (read from
    ``retrain_cache`` when there). Shared by ``evaluate`` and the defaults benchmark."""
    from beam_influence.core.model_spec import load_spec
    from beam_influence.evaluation import lds as lds_mod
    from beam_influence.evaluation.loading import load_callable

    spec = load_spec(a.spec, **a.spec_args)
    load = load_callable(a.data, what="dataset factory (--data)")
    clean = load(test_fraction=a.test_fraction, label_noise=0.0, seed=a.seed)
    task, info = _train_task(spec, a, clean, query_indices(a, len(clean.test)), progress=progress)
    acc = "—" if info["test_accuracy"] is None else format(info["test_accuracy"], ".3f")
    log(f"base model {spec.name}: p={info['num_params']:,}, N={info['n_train']}, Q={info['n_queries']}, "
        f"trained in {info['train_seconds']:.1f}s, test accuracy {acc}")
    masks = lds_mod.subset_masks(task.n_train, a.num_subsets, fraction=a.subset_fraction, seed=a.seed)
    job = lds_mod.retrain_job(a.spec, a.spec_args, task.train, task.test, masks, steps=a.steps,
                              learning_rate=a.learning_rate, batch_size=a.batch_size, seed=a.seed,
                              train_fn=None if a.train_fn == EvalArgs.train_fn else a.train_fn)
    cached = bool(retrain_cache) and os.path.exists(lds_mod.cache_path(job, retrain_cache))
    t0 = time.perf_counter()
    targets = lds_mod.run_retraining(job, pipeline_args=pipeline_args, progress=progress, cache_dir=retrain_cache)
    retraining = dict(num_subsets=a.num_subsets, seconds=time.perf_counter() - t0, cached=cached,
                      cache_key=job.cache_key(), mean_test_loss=float(-targets.mean()))
    log(f"retrained {a.num_subsets} models on {a.subset_fraction:.0%} subsets in {retraining['seconds']:.1f}s"
        + (" (read from the cache)" if cached else ""))
    return spec, task, info, masks, targets, retraining


def evaluate(a: EvalArgs, *, pipeline_args: Sequence[str] | None = None, retrain_cache: str | None = None,
             progress: bool = True, log=print) -> dict:
    """Run the evaluation described in the module docstring; returns the JSON-serialisable result."""
    from tqdm import tqdm

    from beam_influence.core.estimate import EigensystemArgs
    from beam_influence.evaluation import lds as lds_mod
    from beam_influence.evaluation.agreement import agreement
    from beam_influence.evaluation.gradients import grad_sq_norms
    from beam_influence.evaluation.loading import load_callable
    from beam_influence.evaluation.methods import make_method
    from beam_influence.evaluation.mislabel import flipped_mask, mislabel_auc, stratified_sample
    from beam_influence.evaluation.noise import make_noisy

    result: dict[str, Any] = {"args": dataclasses.asdict(a), "machine": machine_info(), "methods": {}}
    # 1.-2. LDS task (clean split, Q queries) and the retraining through Beam
    spec, task, info, masks, targets, result["retraining"] = lds_setup(
        a, pipeline_args=pipeline_args, retrain_cache=retrain_cache, progress=progress, log=log)
    result["lds_task"] = info
    top_k = a.top_k or EigensystemArgs().top_k
    result["eigensystem_defaults"] = {k: getattr(EigensystemArgs(), k) for k in
                                      ("top_k", "num_iters", "sample_size", "fresh_batches", "batch_size")}

    # 3. methods on the LDS task (+ the exact reference for agreement)
    warm_up(task, vector_counts=(top_k, task.n_test))
    reference = None
    want_ref = task.num_params <= a.max_exact_params
    order = (["exact"] if "exact" in a.methods or want_ref else []) + [m for m in a.methods if m != "exact"]
    for name in tqdm(order, desc="methods (LDS task)", unit="method", disable=not progress):
        method = make_method(name, **a.method_options(name))
        method.fit(task)
        t0 = time.perf_counter()
        scores = method.scores()
        score_seconds = time.perf_counter() - t0
        if name == "exact":
            reference = scores
            if name not in a.methods:
                continue
        finite = bool(np.all(np.isfinite(scores)))
        if not finite:
            log(f"  warning: {name} gave non-finite scores (diverged? see its info); LDS and agreement left empty")
        res = lds_mod.lds(np.nan_to_num(scores), masks, targets) if finite else None
        row = dict(lds=res.score if res else None, lds_per_query=[float(x) for x in res.per_query] if res else None,
                   fit_seconds=method.fit_seconds, score_seconds=score_seconds,
                   seconds=method.fit_seconds + score_seconds, info=jsonable(method.info))
        if reference is not None and finite:
            ag = agreement(scores, reference, k=a.agreement_k)
            row.update(spearman_vs_exact=ag.spearman, top_k_proponents_vs_exact=ag.top_k_proponents,
                       top_k_opponents_vs_exact=ag.top_k_opponents, agreement_k=ag.k)
        result["methods"][name] = row
        log(f"  {name:<19} LDS {'—' if row['lds'] is None else format(row['lds'], '.3f')}  ({row['seconds']:.1f}s)")
    got, ideal = result["methods"].get("arnoldi_complement", {}), result["methods"].get("ideal_complement", {})
    if got.get("lds") is not None and ideal.get("lds") is not None:
        got["lds_gap_vs_ideal"] = got["lds"] - ideal["lds"]  # the Done-when check: |gap| ≤ 0.02
        log(f"  arnoldi_complement − ideal_complement at the same k: {got['lds_gap_vs_ideal']:+.3f} LDS")

    # 4. mislabel task
    if a.label_noise > 0:
        load = load_callable(a.data, what="dataset factory (--data)")
        noisy = make_noisy(load, a.noise, label_key=spec.label_key, fraction=a.label_noise,
                           test_fraction=a.test_fraction, seed=a.seed)
        mtask, minfo = _train_task(spec, a, noisy, query_indices(a, len(noisy.test)), progress=progress)
        flipped = flipped_mask([r["id"] for r in noisy.train], noisy.flipped_ids)
        all_cheap = all(make_method(n, **a.method_options(n)).cheap_self_influence for n in a.methods)
        idx = np.arange(mtask.n_train) if all_cheap else stratified_sample(flipped, a.self_influence_max, seed=a.seed)
        minfo.update(label_noise=a.label_noise, noise=a.noise, noise_info=getattr(noisy, "info", {}),
                     n_flipped=int(flipped.sum()), eval_examples=len(idx), eval_flipped=int(flipped[idx].sum()))
        result["mislabel_task"] = minfo
        warm_up(mtask, vector_counts=(top_k, task.n_test))
        # the baselines that need no influence: the training loss and the gradient norm, on the same examples
        import jax

        losses = np.asarray(jax.jit(jax.vmap(spec.loss, in_axes=(None, 0)))(mtask.params, mtask.train), np.float64)
        norms = grad_sq_norms(spec.loss, mtask.params, mtask.train, batch_size=mtask.batch_size)
        result["baselines"] = {}
        for bname, values in (("loss", losses), ("grad_norm", norms)):
            mr, full = mislabel_auc(values[idx], flipped[idx]), mislabel_auc(values, flipped)
            result["baselines"][bname] = dict(mislabel_auc=mr.auc, mislabel_auc_full=full.auc,
                                              mislabel_recall_at_10pct_full=full.recall_at_10pct)
            log(f"  {bname + ' (baseline)':<19} mislabel AUC {mr.auc:.4f}")
        log(f"mislabel task: {minfo['n_flipped']} of {mtask.n_train} labels flipped; self-influence of "
            f"{len(idx)} examples ({minfo['eval_flipped']} flipped)")
        for name in tqdm(list(a.methods), desc="methods (mislabel task)", unit="method", disable=not progress):
            method = make_method(name, **a.method_options(name)).fit(mtask)
            t0 = time.perf_counter()
            si = method.self_influence(idx)
            seconds = time.perf_counter() - t0
            mr = mislabel_auc(si, flipped[idx]) if np.all(np.isfinite(si)) else None
            row = result["methods"].setdefault(name, {})
            row.update(mislabel_auc=mr.auc if mr else None, mislabel_n=len(idx), mislabel_fit_seconds=method.fit_seconds,
                       self_influence_seconds=seconds, mislabel_seconds=method.fit_seconds + seconds,
                       mislabel_info=jsonable(method.info))
            if mr is None:
                log(f"  warning: {name} gave non-finite self-influence (diverged? see its info)")
                continue
            if len(idx) == mtask.n_train:  # recall@10% only means something on the whole training set
                row.update(mislabel_recall_at_10pct=mr.recall_at_10pct)
            elif method.cheap_self_influence:
                full = mislabel_auc(method.self_influence(), flipped)
                row.update(mislabel_auc_full=full.auc, mislabel_recall_at_10pct_full=full.recall_at_10pct)
            log(f"  {name:<19} mislabel AUC {mr.auc:.4f}  ({row['mislabel_seconds']:.1f}s)")
    return result


def query_indices(a: EvalArgs, n_test: int) -> np.ndarray:
    """The seeded sample of ``a.queries`` test examples the LDS task scores."""
    return np.sort(np.random.default_rng(a.seed).choice(n_test, min(a.queries, n_test), replace=False))


def warm_up(task, *, vector_counts: Sequence[int]) -> None:
    """Compile the gradient kernels every method shares (per-example gradient products on a training
    batch and on the test batch, gradient norms), so that the first method timed does not pay for them.
    A method's own compilations (its HVPs) stay in its time."""
    from beam_influence.evaluation.gradients import (flat_grads, grad_sq_norms, gradient_dots, padded_size,
                                                     take)

    one = take(task.train, np.arange(min(task.n_train, padded_size(task.n_train, task.batch_size))))
    flat_grads(task.spec.loss, task.params, task.test)
    grad_sq_norms(task.spec.loss, task.params, one, batch_size=task.batch_size)
    for v in sorted(set(vector_counts)):
        vecs = np.zeros((v, task.num_params), np.float32)
        gradient_dots(task.spec.loss, task.params, one, vecs, batch_size=task.batch_size)
        gradient_dots(task.spec.loss, task.params, task.test, vecs, batch_size=task.batch_size)


# ---- reporting -------------------------------------------------------------------------------------
_COLUMNS = [  # header, key, format
    ("method", None, None), ("LDS", "lds", "{:.3f}"), ("mislabel AUC", "mislabel_auc", "{:.4f}"),
    ("Spearman vs exact", "spearman_vs_exact", "{:.3f}"), ("top-k overlap", "_overlap", "{:.2f}"),
    ("LDS − ideal", "lds_gap_vs_ideal", "{:+.3f}"), ("LDS time (s)", "seconds", "{:.1f}"), ("mislabel time (s)", "mislabel_seconds", "{:.1f}"),
]


def table_rows(result: dict) -> list[list[str]]:
    rows = []
    for name, r in result["methods"].items():
        r = dict(r)
        if "top_k_proponents_vs_exact" in r:
            r["_overlap"] = 0.5 * (r["top_k_proponents_vs_exact"] + r["top_k_opponents_vs_exact"])
        row = [name]
        for _, key, fmt in _COLUMNS[1:]:
            v = r.get(key)
            if v is None or (isinstance(v, float) and not np.isfinite(v)):
                row.append("—")
            else:
                row.append("{:.2f}".format(v) if "seconds" in key and v < 1 else fmt.format(v))
        rows.append(row)
    for name, r in result.get("baselines", {}).items():  # mislabel baselines: no pairwise scores
        row = [f"{name} (baseline)"]
        for _, key, fmt in _COLUMNS[1:]:
            row.append(fmt.format(r[key]) if key == "mislabel_auc" and r.get(key) is not None else "—")
        rows.append(row)
    return rows


def format_table(result: dict) -> str:
    head = [c[0] for c in _COLUMNS]
    rows = table_rows(result)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _eig_text(result: dict) -> str:
    a, d = result["args"], result.get("eigensystem_defaults", {})
    k = a.get("top_k") or d.get("top_k")
    n = a.get("num_iters") or d.get("num_iters")
    m = a.get("sample_size") or d.get("sample_size")
    op = "fresh batches" if a.get("fresh_batches") else "a fixed sample"
    text = f"Arnoldi k = {k}, n = {n} iterations on {op} of up to {m} examples ({a['eigvecs']} eigenvectors)"
    return text + ("" if a.get("top_k") or not d else " — the library defaults")


def markdown(result: dict, *, command: str | None = None) -> str:
    a, t = result["args"], result["lds_task"]
    rt = result["retraining"]
    lines = [f"### {a['spec']} (p = {t['num_params']:,})", ""]
    rtime = "read from the cache" if rt.get("cached") else f"{rt['seconds']:.0f} s"
    lines.append(f"N = {t['n_train']} training examples, {t['n_queries']} test queries, LDS over {a['num_subsets']} "
                 f"retrainings on {a['subset_fraction']:.0%} subsets ({rtime}); {_eig_text(result)}; "
                 f"top-k overlap at k = {a['agreement_k']}.")
    if "mislabel_task" in result:
        m = result["mislabel_task"]
        what = {"uniform": "labels flipped uniformly", "swap": "systematic label swap",
                "duplicates": "conflicting near-duplicates", "atypical": "labels of the most atypical examples flipped"}.get(m.get("noise", "uniform"), "")
        lines[-1] += (f" Mislabel AUC: {a['label_noise']:.0%} {what}, {m['n_flipped']} noisy; self-influence of "
                      f"{m['eval_examples']} training examples ({m['eval_flipped']} noisy).")
    mach = result["machine"]
    lines[-1] += (f" LDS time: fit + scores for the queries; mislabel time: fit + self-influence; on "
                  f"{mach['cpu_count']}-core {mach['jax_backend'].upper()} ({mach['processor']}).")
    lines.append("")
    head = [c[0] for c in _COLUMNS]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in table_rows(result):
        lines.append("| " + " | ".join([f"`{r[0]}`"] + r[1:]) + " |")
    if command:
        lines += ["", "```", command, "```"]
    return "\n".join(lines) + "\n"


# ---- the command -----------------------------------------------------------------------------------
def register(sub) -> None:
    """Add ``evaluate`` to the ``beam-influence`` subparsers (unknown flags are Beam pipeline options)."""
    p = sub.add_parser("evaluate", help="attribution quality: LDS, mislabel AUC, agreement with exact, per method",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_args(p, checkpoint=False)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHOD_NAMES)}")
    p.add_argument("--num-subsets", type=int, default=50, help="M retrainings for the LDS")
    p.add_argument("--subset-fraction", type=float, default=0.5)
    p.add_argument("--queries", type=int, default=100, help="test examples scored (seeded sample of the test split)")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps of the base model and every retraining")
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=None, help="training mini-batch (default: full batch)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--label-noise", type=float, default=0.1, help="flipped fraction for the mislabel task (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=None, help="Arnoldi eigenpairs kept k (default: the library's, 50)")
    p.add_argument("--num-iters", type=int, default=None, help="Arnoldi iterations n (default: the library's, 150)")
    p.add_argument("--sample-size", type=int, default=None,
                   help="the fixed curvature sample of the Arnoldi methods (default: the library's, 8192)")
    p.add_argument("--fresh-batches", action="store_true",
                   help="a fresh batch per curvature product (the reference code's operator; inconsistent)")
    p.add_argument("--data", default="beam_influence.models.digits:load_digits",
                   help="dataset factory pkg.module:name (contract: beam_influence.evaluation.loading)")
    p.add_argument("--train-fn", default="beam_influence.train:train",
                   help="training function pkg.module:name, deterministic for a seed (used for every retraining)")
    p.add_argument("--noise", choices=list(NOISE_KINDS), default="uniform",
                   help="mislabel benchmark: uniform flips, a systematic swap of the two most similar classes, "
                        "near-duplicates with conflicting labels, flips of the most atypical examples (+ ambiguous "
                        "clean blends) "
                        "(--label-noise is the fraction; beam_influence.evaluation.noise)")
    p.add_argument("--eigvecs", choices=["arnoldi", "exact"], default="arnoldi",
                   help="eigenvectors of the arnoldi methods: Arnoldi's, or the dense Hessian's top-k (reference)")
    p.add_argument("--negative", choices=["abs", "drop", "keep"], default="abs", help="negative Ritz values (arnoldi)")
    p.add_argument("--rho", type=float, default=None, help="complement scalar ρ (default: smallest kept |λ|)")
    p.add_argument("--curvature-batch-size", type=int, default=None, help="examples per HVP (default: all)")
    p.add_argument("--cg-tol", type=float, default=1e-5)
    p.add_argument("--cg-max-iters", type=int, default=500)
    p.add_argument("--cg-damping", type=float, default=0.0)
    p.add_argument("--lissa-depth", type=int, default=1000)
    p.add_argument("--lissa-scale", type=float, default=None, help="default 1.25 × λ_max (power iteration)")
    p.add_argument("--lissa-damping", type=float, default=0.0)
    p.add_argument("--lissa-batch-size", type=int, default=None, help="stochastic LiSSA mini-batch (default: all)")
    p.add_argument("--exact-damping", type=float, default=0.0)
    p.add_argument("--exact-negative", choices=["keep", "abs"], default="keep")
    p.add_argument("--max-exact-params", type=int, default=12_000)
    p.add_argument("--agreement-k", type=int, default=10, help="k of the top-k overlap with exact")
    p.add_argument("--self-influence-max", type=int, default=300,
                   help="examples in the mislabel evaluation when a method needs a solve per example")
    p.add_argument("--retrain-cache", default=".cache/lds", help="directory caching retraining targets ('' = off)")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--markdown", default=None, help="markdown table (default: <out without .json>.md)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other arguments")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=run_command, accepts_beam_args=True)


def args_from_namespace(ns: argparse.Namespace) -> EvalArgs:
    fields = {f.name for f in dataclasses.fields(EvalArgs)} - {"spec", "spec_args", "methods"}
    return EvalArgs(spec=ns.spec, spec_args=spec_kwargs(ns.spec_arg),
                    methods=tuple(m.strip() for m in ns.methods.split(",") if m.strip()),
                    **{k: getattr(ns, k) for k in fields})


def run_command(ns: argparse.Namespace) -> int:
    a = args_from_namespace(ns)
    if exists(ns.out) and not ns.overwrite:
        old = read_json(ns.out).get("args")
        if old != json.loads(json.dumps(dataclasses.asdict(a))):
            raise SystemExit(f"{ns.out} holds results computed with other arguments; pass --overwrite to replace it")
    log = (lambda *x: print(*x, file=sys.stderr, flush=True))
    result = evaluate(a, pipeline_args=getattr(ns, "beam_args", None) or None, retrain_cache=ns.retrain_cache or None,
                      progress=not ns.no_progress, log=log)
    command = "beam-influence " + " ".join(sys.argv[1:]) if sys.argv and "evaluate" in sys.argv else None
    result["command"] = command
    write_json(ns.out, result, sort_keys=False, default=float)  # atomic; creates the folder
    md_path = ns.markdown or (ns.out[:-5] if ns.out.endswith(".json") else ns.out) + ".md"
    write_text(md_path, markdown(result, command=command))
    print(format_table(result))
    print(f"→ {ns.out}, {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m beam_influence.evaluation.cli evaluate ...``) until the
    subcommand is wired into ``beam_influence.cli``."""
    parser = argparse.ArgumentParser(prog="beam-influence")
    register(parser.add_subparsers(dest="command", required=True))
    args, rest = parser.parse_known_args(argv)
    args.beam_args = rest
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
