"""Start a real standalone Flink cluster, a Beam worker pool and Prism for tests.

Everything here runs on localhost without Docker:

* :func:`flink_cluster` starts a Flink JobManager
  (``StandaloneSessionClusterEntrypoint``) and one TaskManager
  (``TaskManagerRunner``) as two separate JVMs from the distribution fetched by
  ``tools/flink/fetch.sh``, on free ports, with logs in a temp dir. Its
  TaskManager restart hook (``FlinkCluster.kill_taskmanager`` /
  ``start_taskmanager`` / ``restart_taskmanager``) kills the TaskManager JVM
  mid-job and starts a new one, for fault tests.
* :func:`worker_pool` starts Beam's Python worker pool
  (``python -m apache_beam.runners.worker.worker_pool_main``) with the current
  interpreter so the Flink TaskManager can get SDK harnesses through
  ``--environment_type=EXTERNAL``.
* :func:`flink_pipeline_args` / :func:`prism_pipeline_args` give Beam flags.

Artefact locations come from ``.cache/flink/artifacts.env`` (written by
``fetch.sh``) and can be overridden with the environment variables
``FLINK_HOME``, ``FLINK_JOB_SERVER_JAR`` and ``PRISM_BINARY``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE_DIR = os.environ.get("FLINK_CACHE_DIR", os.path.join(REPO_ROOT, ".cache", "flink"))
PRISM_DIR = os.path.join(REPO_ROOT, ".cache", "prism")
FETCH_HINT = "make runners-fetch  (or: bash tools/flink/fetch.sh)"

# Small cluster for a 2-core machine.
DEFAULT_SLOTS = 2
DEFAULT_JM_MEMORY = "1024m"
DEFAULT_TM_MEMORY = "1280m"


# --------------------------------------------------------------- artefacts
def _artifacts_env() -> dict[str, str]:
    env: dict[str, str] = {}
    path = os.path.join(CACHE_DIR, "artifacts.env")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#") and "=" in line:
                    k, v = line.split("=", 1)
                    env[k] = v
    return env


def flink_home() -> str | None:
    """Directory with ``lib/flink-dist-*.jar`` and ``bin/bash-java-utils.jar``, or None."""
    home = os.environ.get("FLINK_HOME") or _artifacts_env().get("FLINK_HOME")
    if not home:
        cands = sorted(glob.glob(os.path.join(CACHE_DIR, "flink-*", "lib", "flink-dist-*.jar")))
        home = os.path.dirname(os.path.dirname(cands[-1])) if cands else None
    if home and glob.glob(os.path.join(home, "lib", "flink-dist-*.jar")) and os.path.exists(
        os.path.join(home, "bin", "bash-java-utils.jar")
    ):
        return home
    return None


def flink_version(home: str | None = None) -> str | None:
    home = home or flink_home()
    if not home:
        return None
    jars = glob.glob(os.path.join(home, "lib", "flink-dist-*.jar"))
    return os.path.basename(jars[0])[len("flink-dist-") : -len(".jar")] if jars else None


def job_server_jar() -> str | None:
    """The Beam Flink job-server uber jar, or None."""
    jar = os.environ.get("FLINK_JOB_SERVER_JAR") or _artifacts_env().get("FLINK_JOB_SERVER_JAR")
    if not jar:
        cands = sorted(glob.glob(os.path.join(CACHE_DIR, "beam-runners-flink-*-job-server-*.jar")))
        jar = cands[-1] if cands else None
    return jar if jar and os.path.isfile(jar) else None


def missing_flink_artifacts() -> list[str]:
    """Human-readable list of what is missing to run on Flink (empty = ready)."""
    missing = []
    if not shutil.which("java"):
        missing.append("java on PATH")
    if not flink_home():
        missing.append(f"Flink distribution under {CACHE_DIR}/flink-*")
    if not job_server_jar():
        missing.append(f"Beam Flink job-server jar under {CACHE_DIR}")
    return missing


def prism_binary() -> str | None:
    """Path to a locally built prism binary (``$PRISM_BINARY`` or ``.cache/prism/bin/prism``), or None."""
    for cand in (os.environ.get("PRISM_BINARY"), os.path.join(PRISM_DIR, "bin", "prism")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open at once so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_group(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session=True), then SIGKILL."""
    if proc is None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        elif proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # Leader is gone; still make sure no child of the group survives.
        if pgid is not None and sig == signal.SIGTERM:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        return


def _tail(path: str, n: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _classpath(home: str) -> str:
    # Same order as Flink's config.sh: other lib jars sorted, flink-dist last.
    jars = sorted(glob.glob(os.path.join(home, "lib", "*.jar")))
    dist = [j for j in jars if os.path.basename(j).startswith("flink-dist")]
    return os.pathsep.join([j for j in jars if j not in dist] + dist)


def _resource_params(home: str, conf_dir: str, which: str) -> tuple[list[str], list[str]]:
    """Run Flink's BashJavaUtils like bin/config.sh does: (jvm args, dynamic -D configs)."""
    cp = os.pathsep.join([os.path.join(home, "bin", "bash-java-utils.jar"), _classpath(home)])
    out = subprocess.run(
        ["java", "-Xmx128m", "-cp", cp, "org.apache.flink.runtime.util.bash.BashJavaUtils", which,
         "--configDir", conf_dir],
        capture_output=True, text=True, timeout=120,
    )
    prefix = "BASH_JAVA_UTILS_EXEC_RESULT:"
    lines = [ln[len(prefix):] for ln in out.stdout.splitlines() if ln.startswith(prefix)]
    if out.returncode != 0 or len(lines) < 2:
        raise RuntimeError(f"BashJavaUtils {which} failed (rc={out.returncode}):\n{out.stdout}\n{out.stderr}")
    return lines[0].split(), lines[1].split()


_LOG4J = """\
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = MainAppender
logger.pekko.name = org.apache.pekko
logger.pekko.level = WARN
logger.netty.name = org.apache.flink.shaded.netty4.io.netty
logger.netty.level = WARN
appender.main.name = MainAppender
appender.main.type = File
appender.main.append = true
appender.main.fileName = ${sys:log.file}
appender.main.layout.type = PatternLayout
appender.main.layout.pattern = %d{yyyy-MM-dd HH:mm:ss,SSS} %-5p %-60c %x - %m%n
"""


@dataclasses.dataclass
class FlinkCluster:
    rest_url: str  # "localhost:<port>", what --flink_master wants
    rest_port: int
    rpc_port: int
    flink_home: str
    flink_version: str
    job_server_jar: str | None
    log_dir: str
    start_seconds: float
    processes: dict = dataclasses.field(default_factory=dict, repr=False)
    commands: dict = dataclasses.field(default_factory=dict, repr=False)  # name -> argv that started it
    slots: int = DEFAULT_SLOTS

    def overview(self) -> dict:
        with urllib.request.urlopen(f"http://{self.rest_url}/overview", timeout=5) as r:
            return json.load(r)

    def jobs(self) -> list[dict]:
        with urllib.request.urlopen(f"http://{self.rest_url}/jobs/overview", timeout=5) as r:
            return json.load(r).get("jobs", [])

    def taskmanagers(self) -> list[dict]:
        with urllib.request.urlopen(f"http://{self.rest_url}/taskmanagers", timeout=5) as r:
            return json.load(r).get("taskmanagers", [])

    # ---- the TaskManager restart hook: a worker that dies mid-job, and comes back
    def kill_taskmanager(self) -> None:
        """SIGKILL the TaskManager JVM (its whole process group), as a crashed machine would die: no
        shutdown hooks, no goodbye to the JobManager, which notices by failed heartbeats."""
        proc = self.processes.get("taskmanager")
        if proc is None or proc.poll() is not None:
            raise RuntimeError("no running TaskManager to kill")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
        proc.wait(timeout=30)

    def start_taskmanager(self, timeout: float = 180.0) -> None:
        """Start a TaskManager again with the command that started the first one (same config, ports and
        slots), and wait until the JobManager has it registered with all its slots."""
        old = self.processes.get("taskmanager")
        if old is not None and old.poll() is None:
            raise RuntimeError("the TaskManager is still running; kill_taskmanager() first")
        try:
            before = {tm.get("id") for tm in self.taskmanagers()}  # the dead one may still be listed
        except OSError:
            before = set()
        n = sum(1 for name in os.listdir(self.log_dir) if name.startswith("taskmanager"))
        out = open(os.path.join(self.log_dir, f"taskmanager-restart{n}.out"), "wb")
        cmd = [a.replace("taskmanager.log", f"taskmanager-restart{n}.log") if a.startswith("-Dlog.file=") else a
               for a in self.commands["taskmanager"]]
        self.processes["taskmanager"] = proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.log_dir,
            start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the restarted TaskManager exited with {proc.returncode}\n" + self.log_tails())
            try:
                if any(tm.get("id") not in before and tm.get("slotsNumber", 0) >= self.slots
                       for tm in self.taskmanagers()):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the restarted TaskManager did not register in {timeout:.0f}s\n"
                                   + self.log_tails())
            time.sleep(0.5)

    def restart_taskmanager(self, down_seconds: float = 0.0, timeout: float = 180.0) -> None:
        """``kill_taskmanager()``, wait ``down_seconds``, ``start_taskmanager()``: the hook fault tests use to
        check that a job survives (Flink restarts its tasks) or fails loudly."""
        self.kill_taskmanager()
        time.sleep(down_seconds)
        self.start_taskmanager(timeout)

    def log_tails(self, n: int = 40) -> str:
        parts = []
        for path in sorted(glob.glob(os.path.join(self.log_dir, "*.log")) + glob.glob(os.path.join(self.log_dir, "*.out"))):
            parts.append(f"==> {path} <==\n{_tail(path, n)}")
        return "\n".join(parts)


@contextlib.contextmanager
def flink_cluster(
    slots: int = DEFAULT_SLOTS,
    jm_memory: str = DEFAULT_JM_MEMORY,
    tm_memory: str = DEFAULT_TM_MEMORY,
    startup_timeout: float = 180.0,
    keep_logs: bool | None = None,
    restart_attempts: int = 3,
) -> Iterator[FlinkCluster]:
    """Start JobManager + 1 TaskManager; yield a :class:`FlinkCluster`; stop both on exit.

    A job whose tasks fail (e.g. their TaskManager was killed: ``FlinkCluster.restart_taskmanager``) is
    restarted up to ``restart_attempts`` times, 2 s apart, then fails.

    Logs go to a temp dir (``cluster.log_dir``), removed on exit unless
    ``keep_logs`` (default: ``$FLINK_KEEP_LOGS`` set) or the startup failed.
    """
    home = flink_home()
    if not home:
        raise FileNotFoundError(f"no Flink distribution under {CACHE_DIR}; run: {FETCH_HINT}")
    if keep_logs is None:
        keep_logs = bool(os.environ.get("FLINK_KEEP_LOGS"))
    version = flink_version(home) or "?"
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="flink-cluster-")
    conf_dir = os.path.join(work, "conf")
    os.makedirs(conf_dir)
    os.makedirs(os.path.join(work, "tmp"))
    rpc_port, rest_port, blob_port, tm_rpc_port, tm_data_port = _free_ports(5)
    conf = {
        "jobmanager.rpc.address": "localhost",
        "jobmanager.rpc.port": rpc_port,
        "jobmanager.bind-host": "localhost",
        "jobmanager.memory.process.size": jm_memory,
        "rest.address": "localhost",
        "rest.bind-address": "localhost",
        "rest.port": rest_port,
        "blob.server.port": blob_port,
        "taskmanager.host": "localhost",
        "taskmanager.bind-host": "localhost",
        "taskmanager.rpc.port": tm_rpc_port,
        "taskmanager.data.port": tm_data_port,
        "taskmanager.numberOfTaskSlots": slots,
        "taskmanager.memory.process.size": tm_memory,
        "parallelism.default": slots,
        # Batch jobs use Flink's sort-shuffle, which by default wants 512 network
        # buffers per result partition; too many for a ~1 GB TaskManager running
        # Beam's multi-stage jobs with 2 slots.
        "taskmanager.memory.network.min": "128m",
        "taskmanager.memory.network.max": "128m",
        "taskmanager.network.sort-shuffle.min-buffers": "64",
        "io.tmp.dirs": os.path.join(work, "tmp"),
        "web.tmpdir": os.path.join(work, "tmp"),
        "metrics.internal.query-service.port": "0",
        "heartbeat.timeout": "60000",
        # A TaskManager that dies (``FlinkCluster.kill_taskmanager``) is noticed after two failed heartbeat
        # RPCs (not the 60 s timeout), and its job's tasks are restarted on the TaskManager that replaces it.
        "heartbeat.interval": "2000",
        "heartbeat.rpc-failure-threshold": "2",
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": restart_attempts,
        "restart-strategy.fixed-delay.delay": "2 s",
    }
    # Flink 1.x reads flink-conf.yaml (flat "key: value"); Flink 2.x only config.yaml.
    # Flat keys are valid YAML too, so one content fits both.
    conf_name = "config.yaml" if version.startswith("2.") else "flink-conf.yaml"
    with open(os.path.join(conf_dir, conf_name), "w") as f:
        f.writelines(f"{k}: {v}\n" for k, v in conf.items())
    with open(os.path.join(conf_dir, "log4j.properties"), "w") as f:
        f.write(_LOG4J)

    procs: dict[str, subprocess.Popen] = {}
    commands: dict[str, list[str]] = {}
    ok = False
    try:
        cp = _classpath(home)
        specs = [
            ("jobmanager", "GET_JM_RESOURCE_PARAMS", "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
             ["--executionMode", "cluster"]),
            ("taskmanager", "GET_TM_RESOURCE_PARAMS", "org.apache.flink.runtime.taskexecutor.TaskManagerRunner", []),
        ]
        for name, params_cmd, main_class, extra in specs:
            jvm_args, dyn = _resource_params(home, conf_dir, params_cmd)
            log_file = os.path.join(work, f"{name}.log")
            cmd = (
                ["java", "-XX:+UseSerialGC", *jvm_args,
                 f"-Dlog.file={log_file}",
                 f"-Dlog4j.configurationFile=file:{os.path.join(conf_dir, 'log4j.properties')}",
                 "-classpath", cp, main_class, "--configDir", conf_dir, *extra, *dyn]
            )
            commands[name] = cmd
            out = open(os.path.join(work, f"{name}.out"), "wb")
            procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=work, start_new_session=True,
            )
            out.close()
        cluster = FlinkCluster(
            rest_url=f"localhost:{rest_port}", rest_port=rest_port, rpc_port=rpc_port,
            flink_home=home, flink_version=version, job_server_jar=job_server_jar(),
            log_dir=work, start_seconds=0.0, processes=procs, commands=commands, slots=slots,
        )
        deadline = time.monotonic() + startup_timeout
        last_err: object = None
        while True:
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(
                        f"Flink {name} exited with {p.returncode} during startup; logs in {work}\n"
                        + cluster.log_tails())
            try:
                ov = cluster.overview()
                if ov.get("taskmanagers", 0) >= 1 and ov.get("slots-total", 0) >= slots:
                    break
                last_err = ov
            except OSError as e:  # connection refused / not ready yet
                last_err = e
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Flink cluster not ready after {startup_timeout:.0f}s (last: {last_err}); logs in {work}\n"
                    + cluster.log_tails())
            time.sleep(0.5)
        cluster.start_seconds = time.monotonic() - t0
        ok = True
        yield cluster
    finally:
        # TaskManager first so the JobManager does not wait on heartbeats.
        for name in ("taskmanager", "jobmanager"):
            _kill_group(procs.get(name))
        if ok and not keep_logs:
            shutil.rmtree(work, ignore_errors=True)


# -------------------------------------------------------------- worker pool
@dataclasses.dataclass
class WorkerPool:
    port: int
    address: str  # "localhost:<port>", what --environment_config wants
    log_file: str
    process: subprocess.Popen = dataclasses.field(repr=False)


@contextlib.contextmanager
def worker_pool(port: int | None = None, startup_timeout: float = 60.0) -> Iterator[WorkerPool]:
    """Start ``python -m apache_beam.runners.worker.worker_pool_main`` with sys.executable.

    The workers it forks see the same ``sys.path`` as this process (passed as
    PYTHONPATH), so DoFns pickled by reference from test modules import there.
    """
    port = port or free_port()
    fd, log_file = tempfile.mkstemp(prefix="beam-worker-pool-", suffix=".log")
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([REPO_ROOT, os.getcwd(), *paths]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
        stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
        start_new_session=True,
    )
    os.close(fd)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker pool exited with {proc.returncode}:\n{_tail(log_file)}")
            try:
                with socket.create_connection(("localhost", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker pool not listening on {port}:\n{_tail(log_file)}")
                time.sleep(0.2)
        yield WorkerPool(port=port, address=f"localhost:{port}", log_file=log_file, process=proc)
    finally:
        _kill_group(proc, timeout=5.0)
        with contextlib.suppress(OSError):
            os.remove(log_file)


# -------------------------------------------------------------- Beam flags
def flink_pipeline_args(cluster: FlinkCluster, pool: WorkerPool, parallelism: int = 2) -> list[str]:
    """Beam flags to run a Python pipeline on ``cluster`` with SDK workers from ``pool``."""
    jar = cluster.job_server_jar or job_server_jar()
    if not jar:
        raise FileNotFoundError(f"no Beam Flink job-server jar under {CACHE_DIR}; run: {FETCH_HINT}")
    return [
        "--runner=FlinkRunner",
        f"--flink_master={cluster.rest_url}",
        f"--flink_version={'.'.join(cluster.flink_version.split('.')[:2])}",
        f"--flink_job_server_jar={jar}",
        "--environment_type=EXTERNAL",
        f"--environment_config={pool.address}",
        f"--parallelism={parallelism}",
        "--sdk_worker_parallelism=1",
        # The job server JVM (started by the FlinkRunner with `java -jar`) would
        # otherwise take 1/4 of the machine's RAM as max heap.
        "--job_server_jvm_properties=-Xmx512m",
        "--job_server_jvm_properties=-XX:+UseSerialGC",
    ]


def prism_pipeline_args(binary: str | None = None, environment_type: str = "LOOPBACK") -> list[str]:
    """Beam flags to run on Prism from a local binary (never downloads one)."""
    binary = binary or prism_binary()
    if not binary:
        raise FileNotFoundError(f"no prism binary under {PRISM_DIR}/bin; run: make runners-fetch")
    return [
        "--runner=PrismRunner",
        f"--prism_location={binary}",
        f"--environment_type={environment_type}",
    ]
