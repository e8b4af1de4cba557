"""The embedded default: audit scikit-learn's digits (or a generated translation task) end to end and write a report.

    python -m pipelines.demo --out demo_out [--fast] [beam pipeline options]
    python -m pipelines.demo --task translation --out demo_seq [--fast]

In one process, with a line (and timing) per stage:
  1. data         digits as Parquet shards, 10% of the training labels flipped (seeded; ids recorded)
  2. train        the small CNN (``beam_influence.models.digits:cnn``), optax Adam
  3. eigensystem  Arnoldi on the training-loss Hessian → top-k Ritz pairs (+ residuals)
  4. queries      ~10 test digits to explain (a few the model gets wrong, then one per class)
  5. index        Beam: every training example → projected gradient, loss, self-influence
  6. query        Beam: top-k proponents/opponents of the chosen test digits
  7. audit        Beam: top-N training examples by self-influence
  8. report       ``DIR/report.html`` (one static file) from the files above

The Beam jobs run on the DirectRunner in multi-processing mode with 2 workers unless other pipeline
options are given (``--fast`` uses the in-process FnApiRunner, fewer training steps and Arnoldi
iterations: a smoke run for tests). ``DIR/run.json`` records every argument, the model fingerprint,
counts in and out, dead letters, seconds per stage, the total, and the report's metrics (ROC-AUC…).
Beam's own logging (the launcher's and its workers') goes to ``DIR/logs/<stage>.log``
(``--show_beam_logs`` keeps it on the terminal). XLA executables are cached in ``DIR/.jax_cache``
(the query job reuses the projector the index job compiled; reruns skip most compiles).
Rerunning replaces the demo's own outputs under DIR (data/, model/, index/, query/, audit/, logs/,
report.html, run.json) and nothing else.

``--task translation`` runs the same stages on the toy translation task of
``beam_influence.models.sequence`` (a small encoder-decoder Transformer; variable-length token sequences
in buckets): 10% of the training pairs are noisy (random, shifted, copied-source and truncated targets;
ids and kinds recorded), queries are test pairs, and the report shows source/target text and the noisy-pair
ROC-AUC per noise kind for self-influence, self-influence with the complement term, and the loss alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

DEFAULT_RUNNER = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
FAST_RUNNER = ["--runner=FnApiRunner"]
OWNED = ("data", "model", "index", "query", "audit", "logs", "report.html", "run.json")

# Settings: full demo and --fast. Chosen by measurement on a 2-core machine (see docs/demo.md).
FULL = dict(steps=250, learning_rate=1e-2, train_batch_size=128, num_iters=30, eig_k=20, eig_batch_size=1024)
FAST = dict(steps=150, learning_rate=1e-2, train_batch_size=128, num_iters=16, eig_k=8, eig_batch_size=512)
# The translation task: settings per mode, chosen by measurement (docs/demo.md).
SEQ_FULL = dict(steps=2500, learning_rate=3e-3, train_batch_size=64, num_iters=30, eig_k=20, eig_batch_size=512,
                n_train=750, n_test=200)
SEQ_FAST = dict(steps=300, learning_rate=3e-3, train_batch_size=64, num_iters=12, eig_k=8, eig_batch_size=256,
                n_train=600, n_test=60)
SPECS = {"digits": "beam_influence.models.digits:cnn", "translation": "beam_influence.models.sequence:translation"}
TRANSLATION_META = "translation_meta.json"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (the report is DIR/report.html)")
    p.add_argument("--fast", action="store_true",
                   help="smoke run: fewer steps/iterations and the in-process FnApiRunner (for tests)")
    p.add_argument("--task", default="digits", choices=sorted(SPECS),
                   help="digits (images, flipped labels) or translation (token sequences, noisy pairs)")
    p.add_argument("--spec", default=None, help=f"model spec (default per task: {SPECS})")
    p.add_argument("--spec_arg", action="append", default=[], metavar="KEY=VALUE", help="spec factory argument")
    p.add_argument("--label_noise", type=float, default=0.1,
                   help="fraction of training labels flipped (translation: of training pairs corrupted)")
    p.add_argument("--n_train", type=int, default=None, help="translation: training pairs generated")
    p.add_argument("--n_test", type=int, default=None, help="translation: test pairs generated")
    p.add_argument("--num_shards", type=int, default=4, help="record shards per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {FULL['steps']}, fast {FAST['steps']})")
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--train_batch_size", type=int, default=None)
    p.add_argument("--num_iters", type=int, default=None, help="Arnoldi iterations")
    p.add_argument("--eig_k", type=int, default=None, help="Ritz pairs kept")
    p.add_argument("--eig_batch_size", type=int, default=None, help="examples per Hessian-vector product")
    p.add_argument("--num_queries", type=int, default=10, help="test digits to explain")
    p.add_argument("--top_k", type=int, default=10, help="proponents and opponents per query")
    p.add_argument("--self_influence_top", type=int, default=100, help="suspects written by the audit")
    p.add_argument("--projection_batch_size", type=int, default=64, help="examples per projection batch")
    p.add_argument("--normalization", default="none", choices=["none", "train_norm", "cosine"],
                   help="score normalisation of the query job")
    p.add_argument("--compile_cache", default=None,
                   help="JAX persistent compilation cache shared by this process and the Beam workers "
                        "(default DIR/.jax_cache, kept across reruns; 'none' disables it)")
    p.add_argument("--show_beam_logs", action="store_true",
                   help="let Beam and its workers log to the terminal (default: DIR/logs/<stage>.log)")
    args, beam_args = p.parse_known_args(argv)
    if args.task == "translation":
        settings = SEQ_FAST if args.fast else SEQ_FULL
    else:
        settings = FAST if args.fast else FULL
    for key, value in settings.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.spec is None:
        args.spec = SPECS[args.task]
    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = (FAST_RUNNER if args.fast else DEFAULT_RUNNER) + beam_args
    return args, beam_args


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished, waited-for children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextlib.contextmanager
def stderr_to(path: str | None):
    """Send file descriptor 2 (this process's and the Beam workers' it starts) to ``path``; None: no change."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def use_compile_cache(path: str) -> None:
    """Persist XLA executables under ``path`` for this process and (through the environment) for Beam's
    worker processes: the query job reuses the projector the index job compiled, and reruns skip compiles."""
    os.makedirs(path, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    if "jax" in sys.modules:  # already imported (e.g. under pytest): set it on the live config too
        import jax

        jax.config.update("jax_compilation_cache_dir", path)


class Stages:
    """Runs named stages, prints a line per stage with its time, and records them for run.json."""

    def __init__(self, total: int):
        self.total, self.records, self.t0 = total, [], time.time()

    def run(self, name: str, fn: Callable[[], tuple[Any, str, str]]) -> Any:
        i = len(self.records) + 1
        print(f"[{i}/{self.total}] {name} …", flush=True)
        t, cpu = time.time(), _cpu_seconds()
        value, into, out = fn()
        dt = time.time() - t
        self.records.append({"name": name, "seconds": round(dt, 3), "cpu_seconds": round(_cpu_seconds() - cpu, 3),
                             "in": into, "out": out})
        print(f"[{i}/{self.total}] {name} done in {dt:.1f}s — {into} → {out} (elapsed {self.elapsed():.1f}s)",
              flush=True)
        return value

    def elapsed(self) -> float:
        return time.time() - self.t0


def clean(out: str) -> None:
    """Remove the demo's own outputs under ``out`` (and nothing else)."""
    import shutil

    for name in OWNED:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def choose_queries(test: list[dict], predicted: Sequence[int], n: int, *, max_wrong: int = 3) -> list[dict]:
    """Up to ``max_wrong`` misclassified test digits (by id), then one per true class, then the rest by id."""
    wrong = [r for r, p in zip(test, predicted) if int(p) != int(r["y"])][:max_wrong]
    chosen = {r["id"]: r for r in wrong[:n]}
    for r in test:  # one per class not yet represented
        if len(chosen) >= n:
            break
        if r["id"] not in chosen and all(int(c["y"]) != int(r["y"]) for c in chosen.values()):
            chosen[r["id"]] = r
    for r in test:
        if len(chosen) >= n:
            break
        chosen.setdefault(r["id"], r)
    return sorted(chosen.values(), key=lambda r: r["id"])


def _environment(load_at_start: Sequence[float]) -> dict:
    import platform

    import apache_beam
    import jax

    return {"python": platform.python_version(), "apache_beam": apache_beam.__version__, "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in load_at_start]}


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the whole demo; returns the run record (also written to ``DIR/run.json``)."""
    load_at_start = os.getloadavg()
    args, beam_args = parse_args(argv)
    out = os.path.abspath(args.out)
    stages = Stages(total=9)
    print(f"beam-influence demo → {out}  (runner options: {' '.join(beam_args)})", flush=True)
    cache = args.compile_cache or os.path.join(out, ".jax_cache")
    if cache.lower() != "none":
        use_compile_cache(os.path.abspath(cache))
    logs_dir = os.path.join(out, "logs")

    def beam_log(stage: str) -> str | None:
        return None if args.show_beam_logs else os.path.join(logs_dir, f"{stage}.log")

    def imports():
        import jax  # noqa: F401 - the heavy imports, timed as their own stage
        import apache_beam  # noqa: F401
        import flax  # noqa: F401

        from beam_influence.cli import _QuietBeamImports
        from beam_influence.report import build_report  # noqa: F401 - imports matplotlib lazily

        root = logging.getLogger()
        if not any(isinstance(f, _QuietBeamImports) for f in root.filters):
            root.addFilter(_QuietBeamImports())
        return None, "python", "jax, flax, apache_beam"

    stages.run("imports", imports)
    import jax
    import numpy as np

    from beam_influence.cli import spec_kwargs as parse_spec_args
    from beam_influence.data import load_examples
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.formats import read_records, write_records
    from beam_influence.formats.convert import META_FILE, convert_digits
    from beam_influence.core.model_spec import fingerprint, load_spec
    from beam_influence.models.digits import predict
    from beam_influence.report import ReportInputs, build_report
    from beam_influence.train import train
    from pipelines import index as index_job
    from pipelines import query as query_job
    from pipelines import self_influence as audit_job

    clean(out)
    os.makedirs(out, exist_ok=True)
    data_dir, model_dir = os.path.join(out, "data"), os.path.join(out, "model")
    ckpt, eig_path = os.path.join(model_dir, "checkpoint.msgpack"), os.path.join(model_dir, "eigensystem.safetensors")
    index_dir, query_dir, audit_dir = (os.path.join(out, d) for d in ("index", "query", "audit"))
    spec_kwargs = parse_spec_args(args.spec_arg)
    spec = load_spec(args.spec, **spec_kwargs)
    state: dict[str, Any] = {}

    def data():
        pats = convert_digits(data_dir, formats=["parquet"], num_shards=args.num_shards,
                              label_noise=args.label_noise, seed=args.seed)["parquet"]
        with open(os.path.join(data_dir, META_FILE)) as f:
            meta = json.load(f)
        state.update(train_pattern=pats["train"], test_pattern=pats["test"], meta=meta)
        return (None, f"{meta['n_train'] + meta['n_test']} digits",
                f"{meta['n_train']} train ({len(meta['flipped_ids'])} flipped) + {meta['n_test']} test records")

    def train_stage():
        loaded = load_examples(spec, state["train_pattern"])
        params = train(spec, loaded.batch, steps=args.steps, learning_rate=args.learning_rate,
                       batch_size=args.train_batch_size, seed=args.seed)
        os.makedirs(model_dir, exist_ok=True)
        spec.save_params(ckpt, params)
        test = read_records(state["test_pattern"])
        pred = predict(spec, params, np.stack([np.asarray(r["x"], np.float32) for r in test]))
        acc = float(np.mean(pred == np.asarray([r["y"] for r in test])))
        fp = fingerprint(spec, params)
        n_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
        state.update(params=params, train_batch=loaded.batch, test=test, pred=pred, fingerprint=fp)
        state["model"] = {"spec": args.spec, "spec_args": spec_kwargs, "name": spec.name, "fingerprint": fp,
                          "num_params": n_params, "test_accuracy": acc,
                          "train_objective": float(spec.batch_loss(params, loaded.batch)), "checkpoint": ckpt}
        return (None, f"{loaded.n} examples ({len(loaded.bad)} bad), {args.steps} Adam steps",
                f"p={n_params:,}, test accuracy {100 * acc:.1f}%, fingerprint {fp[:12]}…")

    def eig_stage():
        eargs = EigensystemArgs(num_iters=args.num_iters, top_k=args.eig_k, batch_size=args.eig_batch_size,
                                seed=args.seed)
        es = compute_eigensystem(spec, state["params"], state["train_batch"], eargs, progress=True)
        es.save(eig_path)
        state["eigensystem"] = {"id": es.id, "k": es.k, "args": dict(es.args),
                                "ritz_values": es.ritz_values.tolist(), "path": eig_path}
        return (None, f"{args.num_iters} Hessian-vector products × {args.eig_batch_size} examples",
                f"k={es.k} Ritz pairs, λ {es.ritz_values[0]:.3g} … {es.ritz_values[-1]:.3g}")

    def queries_stage():
        chosen = choose_queries(state["test"], state["pred"], args.num_queries)
        paths = write_records(chosen, os.path.join(data_dir, "queries", "queries"), "parquet", 1)
        state["query_pattern"] = paths[0]
        wrong = sum(int(state["pred"][i]) != int(r["y"]) for i, r in enumerate(state["test"])
                    if r["id"] in {c["id"] for c in chosen})
        return None, f"{len(state['test'])} test digits", f"{len(chosen)} queries ({wrong} misclassified)"

    def beam_job(stage: str, job, job_args: list[str]) -> dict:
        log = beam_log(stage)
        if log:
            print(f"      Beam logs → {log}", flush=True)
        try:
            with stderr_to(log):
                return job.run(job_args + beam_args)
        except Exception:
            if log:
                print(f"the {stage} job failed; last lines of {log}:\n{_log_tail(log)}", file=sys.stderr)
            raise

    common = [f"--spec={args.spec}", *[f"--spec_arg={a}" for a in args.spec_arg], f"--checkpoint={ckpt}",
              f"--eigensystem={eig_path}", f"--batch_size={args.projection_batch_size}"]

    def index_stage():
        man = beam_job("index", index_job,
                       common + [f"--train_data={state['train_pattern']}", f"--index_dir={index_dir}"])
        state["index"] = man
        c = man.get("counters") or {}
        return (man, f"{c.get('records', '?')} records read",
                f"{man['rows']} index rows in {len(man['shards'])} shards, {man['dead_letters']} dead letters")

    def query_stage():
        s = beam_job("query", query_job, common + [
            f"--test_data={state['query_pattern']}", f"--index_dir={index_dir}", f"--output={query_dir}",
            f"--top_k={args.top_k}", f"--normalization={args.normalization}"])
        state["query"] = s
        return s, f"{args.num_queries} queries × {s['index_rows']} index rows", f"{s['topk_rows']} top-k rows"

    def audit_stage():
        s = beam_job("audit", audit_job, common + [f"--index_dir={index_dir}", f"--output={audit_dir}",
                                                   f"--self_influence_top={args.self_influence_top}"])
        state["audit"] = s
        return s, f"{s['index_rows']} index rows", f"top {s['rows_written']} by self-influence"

    seq = args.task == "translation"
    if seq:  # the same stages on token sequences: generated pairs, a Transformer, test pairs as queries
        from beam_influence.models import sequence as S

        def data():  # noqa: F811 - the translation task's stage
            gen = S.translation_data(n_train=args.n_train, n_test=args.n_test, noise=args.label_noise,
                                     seed=args.seed)
            train_paths = write_records(gen.train, os.path.join(data_dir, "train"), "parquet", args.num_shards)
            test_paths = write_records(gen.test, os.path.join(data_dir, "test"), "parquet", 1)
            pats = {"train": os.path.join(data_dir, "train-*.parquet"), "test": test_paths[0]}
            meta = {"task": "translation", "n_train": len(gen.train), "n_test": len(gen.test),
                    "noise": args.label_noise, "seed": args.seed, "noisy_ids": gen.noisy_ids,
                    "noise_kinds": gen.kinds, "patterns": {"parquet": pats}, "train_files": len(train_paths)}
            with open(os.path.join(data_dir, TRANSLATION_META), "w") as f:
                json.dump(meta, f, indent=1)
            state.update(train_pattern=pats["train"], test_pattern=pats["test"], meta=meta, test=gen.test)
            kinds = {k: list(gen.kinds.values()).count(k) for k in S.NOISE_KINDS}
            return (None, f"{len(gen.train) + len(gen.test)} generated pairs",
                    f"{len(gen.train)} train ({len(gen.noisy_ids)} noisy: {kinds}) + {len(gen.test)} test records")

        def train_stage():  # noqa: F811
            loaded = load_examples(spec, state["train_pattern"])
            params = train(spec, loaded.batch, steps=args.steps, learning_rate=args.learning_rate,
                           batch_size=args.train_batch_size, seed=args.seed)
            os.makedirs(model_dir, exist_ok=True)
            spec.save_params(ckpt, params)
            test = load_examples(spec, state["test_pattern"])
            acc, test_losses = S.teacher_forced_accuracy(spec, params, test.batch)
            fp = fingerprint(spec, params)
            n_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
            state.update(params=params, train_batch=loaded.batch, test_losses=dict(zip(test.ids, test_losses)),
                         fingerprint=fp)
            state["model"] = {"spec": args.spec, "spec_args": spec_kwargs, "name": spec.name, "fingerprint": fp,
                              "num_params": n_params, "test_accuracy": acc, "accuracy_kind": "test token accuracy",
                              "train_objective": float(spec.batch_loss(params, loaded.batch)), "checkpoint": ckpt}
            return (None, f"{loaded.n} pairs ({len(loaded.bad)} bad), {args.steps} Adam steps",
                    f"p={n_params:,}, test token accuracy {100 * acc:.1f}%, fingerprint {fp[:12]}…")

        def queries_stage():  # noqa: F811
            losses = state["test_losses"]
            worst = sorted(losses, key=lambda i: (-losses[i], i))[: max(1, args.num_queries // 3)]
            rest = [r["id"] for r in state["test"] if r["id"] not in worst]
            want = set(worst) | set(rest[: args.num_queries - len(worst)])
            chosen = [r for r in state["test"] if r["id"] in want]
            paths = write_records(chosen, os.path.join(data_dir, "queries", "queries"), "parquet", 1)
            state["query_pattern"] = paths[0]
            return None, f"{len(state['test'])} test pairs", f"{len(chosen)} queries ({len(worst)} of highest loss)"

    stages.run("data", data)
    stages.run("train", train_stage)
    stages.run("eigensystem", eig_stage)
    stages.run("queries", queries_stage)
    stages.run("index", index_stage)
    stages.run("query", query_stage)
    stages.run("audit", audit_stage)

    report_path = os.path.join(out, "report.html")
    run_json = os.path.join(out, "run.json")
    noisy_ids = state["meta"]["noisy_ids"] if seq else state["meta"]["flipped_ids"]
    record = {
        "args": vars(args), "beam_args": beam_args, "model": state["model"], "eigensystem": state["eigensystem"],
        "counts": {
            ("pairs" if seq else "digits"): state["meta"]["n_train"] + state["meta"]["n_test"],
            "train_records": state["meta"]["n_train"],
            "test_records": state["meta"]["n_test"], ("noisy" if seq else "flipped"): len(noisy_ids),
            "queries": args.num_queries, "index_records_read": (state["index"].get("counters") or {}).get("records"),
            "index_rows": state["index"]["rows"], "topk_rows": state["query"]["topk_rows"],
            "audit_rows": state["audit"]["rows_written"],
        },
        "dead_letters": state["index"]["dead_letters"],
        "query_dead_letters": state["query"]["query_dead_letters"],
        "stages": stages.records, "total_seconds": None,
        "paths": {"data": data_dir, "checkpoint": ckpt, "eigensystem": eig_path, "index": index_dir,
                  "query": query_dir, "audit": audit_dir, "report": report_path,
                  "logs": None if args.show_beam_logs else logs_dir,
                  "compile_cache": None if cache.lower() == "none" else os.environ.get("JAX_COMPILATION_CACHE_DIR")},
        "environment": _environment(load_at_start),
    }

    def write_record():
        with open(run_json, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True, default=str)

    inputs = ReportInputs(index_dir=index_dir, query_dir=query_dir, audit_dir=audit_dir, eigensystem=eig_path,
                          data_meta=os.path.join(data_dir, TRANSLATION_META if seq else META_FILE), run_json=run_json,
                          max_queries=args.num_queries)

    def report_stage():
        record["total_seconds"] = round(stages.elapsed(), 1)  # so far; the report shows it
        write_record()
        m = build_report(inputs, report_path)
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
        return (m, "index, query, audit, eigensystem, data meta, run.json",
                f"report.html ({os.path.getsize(report_path) / 1e6:.1f} MB), ROC-AUC {auc}")

    metrics = stages.run("report", report_stage)
    record["stages"] = stages.records
    record["total_seconds"] = round(stages.elapsed(), 1)
    record["metrics"] = metrics
    record["auc"] = metrics.get("auc")
    if seq:
        record["auc_by_kind"] = {key: metrics[key] for key in metrics if key.startswith("auc_")}
    record["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_record()
    print("\nstage         wall s   CPU s")
    for s in stages.records:
        print(f"  {s['name']:<11}{s['seconds']:8.1f}{s['cpu_seconds']:8.1f}")
    print(f"  {'total':<11}{record['total_seconds']:8.1f}{sum(s['cpu_seconds'] for s in stages.records):8.1f}")
    auc, rec = metrics.get("auc"), metrics.get("recall_at_10")
    what = "noisy-pair" if seq else "mislabel"
    print(f"\n{what} ROC-AUC (self-influence): {'n/a' if auc is None else f'{auc:.3f}'}; "
          f"{'noisy pairs' if seq else 'flipped labels'} found in the top 10%: "
          f"{'n/a' if rec is None else f'{100 * rec:.0f}%'}; model {state['model'].get('accuracy_kind', 'test accuracy')} "
          f"{100 * state['model']['test_accuracy']:.1f}%")
    if seq:
        from beam_influence.report.results import NOISE_SCORES

        kinds = metrics.get("noise_kinds") or []
        print("ROC-AUC per noise kind   " + "  ".join(f"{k:>9}" for k in ["all", *kinds]))
        for score, label in NOISE_SCORES:
            vals = [metrics.get(f"auc_{score}_{k}") for k in ["all", *kinds]]
            print(f"  {label:<22} " + "  ".join("      n/a" if v is None else f"{v:9.3f}" for v in vals))
    print(f"demo finished in {record['total_seconds']:.1f}s. Open the report:\n  file://{report_path}\n"
          f"run record: {run_json}")
    return record


if __name__ == "__main__":
    run(sys.argv[1:])
    sys.exit(0)
