"""The embedded default: audit scikit-learn's digits (or a generated translation task) end to end and write a report.

    python -m pipelines.demo --output demo_out [--fast] [beam pipeline options]
    python -m pipelines.demo --task translation --output demo_seq [--fast]

In one process, with a line (and timing) per stage:
  1. data         digits as Parquet shards, 10% of the training labels flipped (seeded; ids recorded)
  2. train        the small CNN (``beam_influence.models.digits:cnn``), optax Adam
  3. eigensystem  Arnoldi on the training-loss Hessian → top-k Ritz pairs (+ residuals)
  4. queries      ~10 test digits to explain (a few the model gets wrong, then one per class)
  5. index        Beam: every training example → projected gradient, loss, self-influence
  6. query        Beam: top-k proponents/opponents of the chosen test digits
  7. audit        Beam: top-N training examples by self-influence
  8. report       ``OUTPUT/report.html`` (one static file) from the files above

The Beam jobs run on the DirectRunner in multi-processing mode with 2 workers unless other pipeline
options are given (``--fast`` uses the in-process FnApiRunner, fewer training steps and Arnoldi
iterations: a smoke run for tests). ``OUTPUT/run.json`` records every argument, the model fingerprint,
counts in and out, dead letters, seconds per stage, the total, and the report's metrics (ROC-AUC…).
Beam's own logging (the launcher's and its workers') goes to ``OUTPUT/logs/<stage>.log``
(``--show_beam_logs`` keeps it on the terminal). XLA executables are cached in the per-user compilation
cache (``--compilation_cache_dir``; the query job reuses the projector the index job compiled; reruns skip
most compiles).
Rerunning replaces the demo's own outputs under OUTPUT (data/, model/, index/, query/, audit/, logs/,
report.html, run.json) and nothing else.

``--task translation`` runs the same stages on the toy translation task of
``beam_influence.models.sequence`` (a small encoder-decoder Transformer; variable-length token sequences
in buckets): 10% of the training pairs are noisy (random, shifted, copied-source and truncated targets;
ids and kinds recorded), queries are test pairs, and the report shows source/target text and the noisy-pair
ROC-AUC per noise kind for self-influence, self-influence with the complement term, and the loss alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

from beam_influence.cli.runtime import apply_compilation_options, prepare_process
from beam_influence.options import DemoOptions, IndexOptions, QueryOptions, SelfInfluenceOptions

DEFAULT_RUNNER = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
FAST_RUNNER = ["--runner=FnApiRunner"]
OWNED = ("data", "model", "index", "query", "audit", "logs", "report.html", "run.json")

# Settings per task and mode, chosen by measurement on a 2-core machine (docs/demo.md); a flag given wins.
SETTINGS = {
    ("digits", False): dict(steps=250, learning_rate=1e-2, train_batch_size=128, num_iters=30, num_eigenpairs=20,
                            curvature_batch_size=1024),
    ("digits", True): dict(steps=150, learning_rate=1e-2, train_batch_size=128, num_iters=16, num_eigenpairs=8,
                           curvature_batch_size=512),
    ("translation", False): dict(steps=2500, learning_rate=3e-3, train_batch_size=64, num_iters=30,
                                 num_eigenpairs=20, curvature_batch_size=512, n_train=750, n_test=200),
    ("translation", True): dict(steps=300, learning_rate=3e-3, train_batch_size=64, num_iters=12, num_eigenpairs=8,
                                curvature_batch_size=256, n_train=600, n_test=60),
}
SPECS = {"digits": "beam_influence.models.digits:cnn", "translation": "beam_influence.models.sequence:translation"}
TRANSLATION_META = "translation_meta.json"


def parse_args(argv: Sequence[str] | None) -> tuple[DemoOptions, list[str]]:
    """The demo's options (``DemoOptions``; the task's settings fill what was not given) and Beam's flags."""
    from beam_influence.cli import flags

    parser = flags.parser_for(DemoOptions, prog="python -m pipelines.demo", description=__doc__.split("\n")[0],
                              epilog="Other --flags are Beam pipeline options (default: the DirectRunner with 2 "
                                     "processes; --fast: the in-process FnApiRunner).")
    ns, beam_args = parser.parse_known_args(list(argv or []))
    task, fast = ns.task or "digits", bool(ns.fast)
    unset = {k: v for k, v in SETTINGS[(task, fast)].items() if getattr(ns, k, None) is None}
    if ns.spec is None:
        unset["spec"] = SPECS[task]
    try:
        if beam_args:
            flags.check_rest(DemoOptions, beam_args, beam=True)
        args = flags.from_namespace(DemoOptions, ns, **unset)
    except ValueError as e:
        parser.error(str(e))
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


class Demo:
    """The demo's stages, one method each; ``self.state`` carries what a stage hands to the next. Each stage
    returns ``(value, what went in, what came out)`` for its progress line (``Stages.run``)."""

    def __init__(self, args: DemoOptions, beam_args: list[str]):
        from beam_influence.cli.flags import spec_kwargs
        from beam_influence.core.model_spec import load_spec

        self.args, self.beam_args = args, beam_args
        self.seq = args.task == "translation"
        out = self.out = os.path.abspath(args.output)
        self.data_dir, self.model_dir = os.path.join(out, "data"), os.path.join(out, "model")
        self.ckpt = os.path.join(self.model_dir, "checkpoint.msgpack")
        self.eig_path = os.path.join(self.model_dir, "eigensystem.safetensors")
        self.index_dir, self.query_dir, self.audit_dir = (os.path.join(out, d) for d in ("index", "query", "audit"))
        self.logs_dir = os.path.join(out, "logs")
        self.spec_kwargs = spec_kwargs(args.spec_arg)
        self.spec = load_spec(args.spec, **self.spec_kwargs)
        self.state: dict[str, Any] = {}

    # ---- stages ----------------------------------------------------------------------------------
    def data(self):
        if self.seq:
            return self._translation_data()
        from beam_influence.formats.convert import META_FILE, convert_digits

        a = self.args
        pats = convert_digits(self.data_dir, formats=["parquet"], num_shards=a.num_shards, label_noise=a.label_noise,
                              seed=a.seed)["parquet"]
        with open(os.path.join(self.data_dir, META_FILE)) as f:
            meta = json.load(f)
        self.state.update(train_pattern=pats["train"], test_pattern=pats["test"], meta=meta)
        return (None, f"{meta['n_train'] + meta['n_test']} digits",
                f"{meta['n_train']} train ({len(meta['flipped_ids'])} flipped) + {meta['n_test']} test records")

    def _translation_data(self):
        from beam_influence.formats import write_records
        from beam_influence.models import sequence as S

        a, d = self.args, self.data_dir
        gen = S.translation_data(n_train=a.n_train, n_test=a.n_test, noise=a.label_noise, seed=a.seed)
        train_paths = write_records(gen.train, os.path.join(d, "train"), "parquet", a.num_shards)
        test_paths = write_records(gen.test, os.path.join(d, "test"), "parquet", 1)
        pats = {"train": os.path.join(d, "train-*.parquet"), "test": test_paths[0]}
        meta = {"task": "translation", "n_train": len(gen.train), "n_test": len(gen.test), "noise": a.label_noise,
                "seed": a.seed, "noisy_ids": gen.noisy_ids, "noise_kinds": gen.kinds, "patterns": {"parquet": pats},
                "train_files": len(train_paths)}
        with open(os.path.join(d, TRANSLATION_META), "w") as f:
            json.dump(meta, f, indent=1)
        self.state.update(train_pattern=pats["train"], test_pattern=pats["test"], meta=meta, test=gen.test)
        kinds = {k: list(gen.kinds.values()).count(k) for k in S.NOISE_KINDS}
        return (None, f"{len(gen.train) + len(gen.test)} generated pairs",
                f"{len(gen.train)} train ({len(gen.noisy_ids)} noisy: {kinds}) + {len(gen.test)} test records")

    def train(self):
        import jax
        import numpy as np

        from beam_influence.core.model_spec import fingerprint
        from beam_influence.data import load_examples
        from beam_influence.train import train

        a, spec = self.args, self.spec
        loaded = load_examples(spec, self.state["train_pattern"])
        params = train(spec, loaded.batch, steps=a.steps, learning_rate=a.learning_rate,
                       batch_size=a.train_batch_size, seed=a.seed)
        os.makedirs(self.model_dir, exist_ok=True)
        spec.save_params(self.ckpt, params)
        if self.seq:
            from beam_influence.models import sequence as S

            test = load_examples(spec, self.state["test_pattern"])
            acc, test_losses = S.teacher_forced_accuracy(spec, params, test.batch)
            self.state["test_losses"] = dict(zip(test.ids, test_losses))
            kind, what = "test token accuracy", "pairs"
        else:
            from beam_influence.formats import read_records
            from beam_influence.models.digits import predict

            test = read_records(self.state["test_pattern"])
            pred = predict(spec, params, np.stack([np.asarray(r["x"], np.float32) for r in test]))
            acc = float(np.mean(pred == np.asarray([r["y"] for r in test])))
            self.state.update(test=test, pred=pred)
            kind, what = "test accuracy", "examples"
        fp = fingerprint(spec, params)
        n_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
        self.state.update(params=params, train_batch=loaded.batch, fingerprint=fp)
        self.state["model"] = {"spec": a.spec, "spec_args": self.spec_kwargs, "name": spec.name, "fingerprint": fp,
                               "num_params": n_params, "test_accuracy": acc, "accuracy_kind": kind,
                               "train_objective": float(spec.batch_loss(params, loaded.batch)),
                               "checkpoint": self.ckpt}
        return (None, f"{loaded.n} {what} ({len(loaded.bad)} bad), {a.steps} Adam steps",
                f"p={n_params:,}, {kind} {100 * acc:.1f}%, fingerprint {fp[:12]}…")

    def eigensystem(self):
        from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem

        a = self.args
        eargs = EigensystemArgs(num_iters=a.num_iters, top_k=a.num_eigenpairs, batch_size=a.curvature_batch_size,
                                sample_size=a.sample_size, seed=a.seed, negative=a.negative,
                                fresh_batches=a.fresh_batches)
        es = compute_eigensystem(self.spec, self.state["params"], self.state["train_batch"], eargs, progress=True)
        es.save(self.eig_path)
        self.state["eigensystem"] = {"id": es.id, "k": es.k, "args": dict(es.args),
                                     "ritz_values": es.ritz_values.tolist(), "path": self.eig_path}
        return (None, f"{a.num_iters} Hessian-vector products × {a.curvature_batch_size} examples",
                f"k={es.k} Ritz pairs, λ {es.ritz_values[0]:.3g} … {es.ritz_values[-1]:.3g}")

    def queries(self):
        from beam_influence.formats import write_records

        a, st = self.args, self.state
        if self.seq:  # the highest-loss third of the test pairs, then the rest in id order
            losses = st["test_losses"]
            worst = sorted(losses, key=lambda i: (-losses[i], i))[: max(1, a.num_queries // 3)]
            rest = [r["id"] for r in st["test"] if r["id"] not in worst]
            want = set(worst) | set(rest[: a.num_queries - len(worst)])
            chosen = [r for r in st["test"] if r["id"] in want]
            note = f"{len(chosen)} queries ({len(worst)} of highest loss)"
        else:
            chosen = choose_queries(st["test"], st["pred"], a.num_queries)
            ids = {c["id"] for c in chosen}
            wrong = sum(int(st["pred"][i]) != int(r["y"]) for i, r in enumerate(st["test"]) if r["id"] in ids)
            note = f"{len(chosen)} queries ({wrong} misclassified)"
        st["query_pattern"] = write_records(chosen, os.path.join(self.data_dir, "queries", "queries"), "parquet", 1)[0]
        return None, f"{len(st['test'])} test {'pairs' if self.seq else 'digits'}", note

    def _job_options(self) -> dict:
        a = self.args
        return dict(spec=a.spec, spec_arg=a.spec_arg, checkpoint=self.ckpt, eigensystem=self.eig_path,
                    compilation_cache=a.compilation_cache, compilation_cache_dir=a.compilation_cache_dir)

    def _beam_job(self, stage: str, job, opts) -> dict:
        log = None if self.args.show_beam_logs else os.path.join(self.logs_dir, f"{stage}.log")
        if log:
            print(f"      Beam logs → {log}", flush=True)
        try:
            with stderr_to(log):
                return job.run_options(opts, self.beam_args)
        except Exception:
            if log:
                print(f"the {stage} job failed; last lines of {log}:\n{_log_tail(log)}", file=sys.stderr)
            raise

    def index(self):
        from pipelines import index as index_job

        man = self._beam_job("index", index_job, IndexOptions(
            **self._job_options(), train_data=self.state["train_pattern"], index_dir=self.index_dir,
            projection_batch_size=self.args.projection_batch_size))
        self.state["index"] = man
        return (man, f"{man['records']} records read",
                f"{man['rows']} index rows in {len(man['shards'])} shards, {man['dead_letters']} dead letters")

    def query(self):
        from pipelines import query as query_job

        a = self.args
        s = self._beam_job("query", query_job, QueryOptions(
            **self._job_options(), test_data=self.state["query_pattern"], index_dir=self.index_dir,
            train_data=self.state["train_pattern"],  # the candidates read back: exact lists
            output=self.query_dir, top_k=a.top_k, normalization=a.normalization,
            projection_batch_size=a.projection_batch_size))
        self.state["query"] = s
        rerank = s.get("exact_rerank") or {}
        exact = (f", {rerank['certified_lists']}/{rerank['lists']} lists certified exact" if rerank.get("mode") == "on"
                 else "")
        return s, f"{a.num_queries} queries × {s['index_rows']} index rows", f"{s['topk_rows']} top-k rows{exact}"

    def audit(self):
        from pipelines import self_influence as audit_job

        s = self._beam_job("audit", audit_job, SelfInfluenceOptions(
            **self._job_options(), index_dir=self.index_dir, output=self.audit_dir,
            self_influence_top=self.args.self_influence_top))
        self.state["audit"] = s
        return s, f"{s['index_rows']} index rows", f"top {s['rows_written']} by self-influence"

    def report(self, record: dict, stages: "Stages"):
        from beam_influence.formats.convert import META_FILE
        from beam_influence.report import ReportInputs, build_report

        report_path, run_json = os.path.join(self.out, "report.html"), os.path.join(self.out, "run.json")
        record["total_seconds"] = round(stages.elapsed(), 1)  # so far; the report shows it
        write_record(run_json, record)
        inputs = ReportInputs(index_dir=self.index_dir, query_dir=self.query_dir, audit_dir=self.audit_dir,
                              eigensystem=self.eig_path, run_json=run_json, max_queries=self.args.num_queries,
                              data_meta=os.path.join(self.data_dir, TRANSLATION_META if self.seq else META_FILE))
        m = build_report(inputs, report_path)
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
        return (m, "index, query, audit, eigensystem, data meta, run.json",
                f"report.html ({os.path.getsize(report_path) / 1e6:.1f} MB), ROC-AUC {auc}")

    # ---- the run record ----------------------------------------------------------------------------
    def record(self, stages: "Stages", cache: str | None, load_at_start) -> dict:
        st, a = self.state, self.args
        noisy_ids = st["meta"]["noisy_ids"] if self.seq else st["meta"]["flipped_ids"]
        return {
            "args": a.as_dict(), "beam_args": self.beam_args, "model": st["model"], "eigensystem": st["eigensystem"],
            "counts": {
                ("pairs" if self.seq else "digits"): st["meta"]["n_train"] + st["meta"]["n_test"],
                "train_records": st["meta"]["n_train"], "test_records": st["meta"]["n_test"],
                ("noisy" if self.seq else "flipped"): len(noisy_ids), "queries": a.num_queries,
                "index_records_read": st["index"]["records"], "index_rows": st["index"]["rows"],
                "topk_rows": st["query"]["topk_rows"], "audit_rows": st["audit"]["rows_written"],
            },
            "dead_letters": st["index"]["dead_letters"], "query_dead_letters": st["query"]["query_dead_letters"],
            "stages": stages.records, "total_seconds": None,
            "paths": {"data": self.data_dir, "checkpoint": self.ckpt, "eigensystem": self.eig_path,
                      "index": self.index_dir, "query": self.query_dir, "audit": self.audit_dir,
                      "report": os.path.join(self.out, "report.html"),
                      "logs": None if a.show_beam_logs else self.logs_dir, "compilation_cache": cache},
            "environment": _environment(load_at_start),
        }


def write_record(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)


def _imports():
    import jax  # noqa: F401 - the heavy imports, timed as their own stage
    import apache_beam  # noqa: F401
    import flax  # noqa: F401

    from beam_influence.report import build_report  # noqa: F401 - imports matplotlib lazily

    return None, "python", "jax, flax, apache_beam"


def print_summary(record: dict, metrics: dict, seq: bool) -> None:
    """The stage table and the headline numbers."""
    print("\nstage         wall s   CPU s")
    for s in record["stages"]:
        print(f"  {s['name']:<11}{s['seconds']:8.1f}{s['cpu_seconds']:8.1f}")
    print(f"  {'total':<11}{record['total_seconds']:8.1f}{sum(s['cpu_seconds'] for s in record['stages']):8.1f}")
    auc, rec = metrics.get("auc"), metrics.get("recall_at_10")
    model = record["model"]
    print(f"\n{'noisy-pair' if seq else 'mislabel'} ROC-AUC ({metrics.get('score_label', 'self-influence')}): "
          f"{'n/a' if auc is None else f'{auc:.3f}'}; {'noisy pairs' if seq else 'flipped labels'} found in the top "
          f"10%: {'n/a' if rec is None else f'{100 * rec:.0f}%'}; model {model['accuracy_kind']} "
          f"{100 * model['test_accuracy']:.1f}%")
    if seq:
        from beam_influence.report.results import NOISE_SCORES

        kinds = metrics.get("noise_kinds") or []
        print("ROC-AUC per noise kind   " + "  ".join(f"{k:>9}" for k in ["all", *kinds]))
        for score, label in NOISE_SCORES:
            vals = [metrics.get(f"auc_{score}_{k}") for k in ["all", *kinds]]
            print(f"  {label:<22} " + "  ".join("      n/a" if v is None else f"{v:9.3f}" for v in vals))


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the whole demo; returns the run record (also written to ``OUTPUT/run.json``)."""
    load_at_start = os.getloadavg()
    args, beam_args = parse_args(argv)
    prepare_process()
    stages = Stages(total=9)
    print(f"beam-influence demo → {os.path.abspath(args.output)}  (runner options: {' '.join(beam_args)})",
          flush=True)
    cache = apply_compilation_options(args)  # shared with this process's Beam workers (the environment)
    print(f"compilation cache: {cache or 'off'}", flush=True)
    stages.run("imports", _imports)
    demo = Demo(args, beam_args)
    clean(demo.out)
    os.makedirs(demo.out, exist_ok=True)
    for name in ("data", "train", "eigensystem", "queries", "index", "query", "audit"):
        stages.run(name, getattr(demo, name))
    record = demo.record(stages, cache, load_at_start)
    metrics = stages.run("report", lambda: demo.report(record, stages))
    record.update(stages=stages.records, total_seconds=round(stages.elapsed(), 1), metrics=metrics,
                  auc=metrics.get("auc"))
    if demo.seq:
        record["auc_by_kind"] = {key: metrics[key] for key in metrics if key.startswith("auc_")}
    record["environment"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    run_json = os.path.join(demo.out, "run.json")
    write_record(run_json, record)
    print_summary(record, metrics, demo.seq)
    print(f"demo finished in {record['total_seconds']:.1f}s. Open the report:\n  file://{record['paths']['report']}\n"
          f"run record: {run_json}")
    return record


if __name__ == "__main__":
    run(sys.argv[1:])
    sys.exit(0)
