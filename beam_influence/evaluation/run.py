"""The evaluation behind ``beam-influence evaluate``: measure attribution quality of every method on one model, as a command.

For a model spec and a dataset (``--data pkg.module:factory``, default scikit-learn's digits; a
training function ``--train_fn pkg.module:train``, default ``beam_influence.train:train``; contracts in
``beam_influence.evaluation.loading``) it

1. trains the base model (``--steps``/``--learning_rate``/``--train_batch_size``, init ``spec.init(seed)``)
   on the clean training split and picks ``--queries`` test examples;
2. retrains it on ``--num_subsets`` random halves of the training set through Beam (one element per
   subset; ``--runner`` and any other Beam flag are passed through; default FnApiRunner) and
   records minus the test loss of each retrained model (cached under ``--retrain_cache``);
3. fits every method of ``--methods`` and reports its **LDS** (Spearman of summed scores vs the
   retrained test losses, mean over queries), its **agreement with exact influence** (Spearman and
   top-k overlap per query, when the dense Hessian fits: p <= ``--max_exact_params``) and its time;
4. with ``--label_noise`` > 0, trains a second model on noisy labels (``--noise``: ``uniform`` flips,
   a systematic ``swap`` between the two most similar classes, conflicting near-``duplicates``, flips of
   the most ``atypical`` inputs, or ``atypical+ambiguous`` — those flips among clean but ambiguous blends,
   the benchmark where the loss alone misses the noisy examples (docs/quality.md);
   ``beam_influence.evaluation.noise``) and reports the **mislabel ROC-AUC** of each method's
   self-influence ranking, always beside the two baselines that need no influence: the training
   loss and the gradient norm ‖∇ℓ(z)‖²;
5. prints a table, writes JSON (``--output``) and a markdown table (``--markdown``, default ``<out>.md``).

The Arnoldi methods use the library's ``EigensystemArgs`` defaults (k, n, sample size, a fixed
sample) unless ``--num_eigenpairs``/``--num_iters``/``--sample_size``/``--fresh_batches`` say otherwise;
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
from typing import Any, ClassVar, Sequence

import numpy as np

from beam_influence.evaluation import METHOD_NAMES
from beam_influence.evaluation.noise import NOISE_KINDS
from beam_influence.options import (ArnoldiOptions, LabelNoiseOptions, RhoOptions, SeedOptions, SpecOptions,
                                    TrainingOptions, option)
from beam_influence.util import jsonable, machine_info

DEFAULT_METHODS = "arnoldi,arnoldi_complement,ideal_complement,exact,cg,lissa,tracin"
BASELINES = ("loss", "grad_norm")  # mislabel baselines: rank by ℓ(z), by ‖∇ℓ(z)‖²


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalArgs(SpecOptions, TrainingOptions, ArnoldiOptions, RhoOptions, LabelNoiseOptions, SeedOptions):
    """Every argument of an evaluation (saved in the JSON result; a rerun with others refuses to overwrite).
    The flags of ``beam-influence evaluate``; shared concepts are declared in ``beam_influence.options``."""

    required: ClassVar = ("spec",)
    methods: tuple[str, ...] = option(tuple(DEFAULT_METHODS.split(",")), split=",",
                                      help=f"methods evaluated, comma-separated or repeated, from "
                                           f"{', '.join(METHOD_NAMES)}")
    num_subsets: int = option(50, low=3, help="M retrainings for the LDS (Spearman over subsets)")
    subset_fraction: float = option(0.5, above=0, high=1, help="fraction of the training set per retraining")
    queries: int = option(100, low=1, help="test examples scored (a seeded sample of the test split)")
    test_fraction: float = option(0.2, above=0, high=0.9, help="test split of the dataset")
    eigvecs: str = option("arnoldi", choices=("arnoldi", "exact"),
                          help="eigenvectors of the arnoldi methods: Arnoldi's, or the dense Hessian's top-k "
                               "(reference)")
    cg_tol: float = option(1e-5, above=0, help="CG: relative residual tolerance")
    cg_max_iters: int = option(500, low=1, help="CG: iterations")
    cg_damping: float = option(0.0, low=0, help="CG: damping δ of (H + δI)")
    lissa_depth: int = option(1000, low=1, help="LiSSA: recursion depth")
    lissa_scale: float | None = option(None, above=0, help="LiSSA: scale (none: 1.25 × λ_max by power iteration)")
    lissa_damping: float = option(0.0, low=0, help="LiSSA: damping")
    lissa_batch_size: int | None = option(None, low=1, help="LiSSA: stochastic mini-batch (none: all)")
    exact_damping: float = option(0.0, low=0, help="exact: damping δ of (H + δI)")
    exact_negative: str = option("keep", choices=("keep", "abs"), help="exact: negative eigenvalues of H")
    max_exact_params: int = option(12_000, low=0, help="largest p for the dense Hessian (exact, agreement; 0 = never)")
    agreement_k: int = option(10, low=1, help="k of the top-k overlap with exact")
    self_influence_max: int = option(300, low=1,
                                     help="examples in the mislabel evaluation when a method needs a solve per "
                                          "example")
    data: str = option("beam_influence.models.digits:load_digits",
                       help="dataset factory pkg.module:name (contract: beam_influence.evaluation.loading)")
    train_fn: str = option("beam_influence.train:train",
                           help="training function pkg.module:name, deterministic for a seed (used for every "
                                "retraining)")
    noise: str = option("uniform", choices=NOISE_KINDS,
                        help="mislabel benchmark: uniform flips, a systematic swap of the two most similar "
                             "classes, near-duplicates with conflicting labels, flips of the most atypical "
                             "examples (+ ambiguous clean blends); beam_influence.evaluation.noise")

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHOD_NAMES]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHOD_NAMES)}")

    @property
    def spec_kwargs(self) -> dict:
        from beam_influence.cli.flags import spec_kwargs

        return spec_kwargs(self.spec_arg)

    def method_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments of ``make_method(name, ...)``."""
        if name in ("arnoldi", "arnoldi_complement", "ideal_complement") or name.startswith("arnoldi_kfac"):
            opts = dict(top_k=self.num_eigenpairs, num_iters=self.num_iters, negative=self.negative,
                        seed=self.seed, sample_size=self.sample_size, fresh_batches=self.fresh_batches)
            if name == "ideal_complement":
                return dict(opts, rho=self.rho, max_exact_params=self.max_exact_params)
            if name.startswith("arnoldi_kfac"):  # the K-FAC options: the library's (KFACOptions)
                return dict(opts, eigvecs=self.eigvecs)
            return dict(opts, rho=self.rho, eigvecs=self.eigvecs)
        if name in ("ekfac", "kfac"):  # k = 0, fitted on the eigensystem's fixed sample
            return dict(sample_size=self.sample_size, seed=self.seed)
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

    return load_callable(a.train_fn, what="training function (--train_fn)")


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
    params = train(spec, train_batch, steps=a.steps, learning_rate=a.learning_rate, batch_size=a.train_batch_size,
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

    spec = load_spec(a.spec, **a.spec_kwargs)
    load = load_callable(a.data, what="dataset factory (--data)")
    clean = load(test_fraction=a.test_fraction, label_noise=0.0, seed=a.seed)
    task, info = _train_task(spec, a, clean, query_indices(a, len(clean.test)), progress=progress)
    acc = "—" if info["test_accuracy"] is None else format(info["test_accuracy"], ".3f")
    log(f"base model {spec.name}: p={info['num_params']:,}, N={info['n_train']}, Q={info['n_queries']}, "
        f"trained in {info['train_seconds']:.1f}s, test accuracy {acc}")
    masks = lds_mod.subset_masks(task.n_train, a.num_subsets, fraction=a.subset_fraction, seed=a.seed)
    job = lds_mod.retrain_job(a.spec, a.spec_kwargs, task.train, task.test, masks, steps=a.steps,
                              learning_rate=a.learning_rate, batch_size=a.train_batch_size, seed=a.seed,
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
    top_k = a.num_eigenpairs
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
    k = a.get("num_eigenpairs") or a.get("top_k") or d.get("top_k")
    n = a.get("num_iters") or d.get("num_iters")
    m = a.get("sample_size") or d.get("sample_size")
    op = "fresh batches" if a.get("fresh_batches") else "a fixed sample"
    text = f"Arnoldi k = {k}, n = {n} iterations on {op} of up to {m} examples ({a['eigvecs']} eigenvectors)"
    default = d and k == d.get("top_k") and n == d.get("num_iters") and m == d.get("sample_size")
    return text + (" — the library defaults" if default else "")


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
