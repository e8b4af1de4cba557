"""The accelerator path on the CPU: on-device Arnoldi basis through the curvature operator, the curvature
product data-parallel over several (virtual) devices, device-aware projection plans, and per-device
worker contexts.

The main pytest process has one CPU device and JAX cannot change that after it starts, so the
multi-device checks run in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from beam_influence.core import arnoldi
from beam_influence.core.curvature import BatchSource, CurvatureOperator, make_matvec, resolve_devices
from beam_influence.models import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample(n=30, seed=2):
    spec = digits.mlp(hidden=6, l2=1e-2)
    d = digits.load_digits(seed=seed)
    host = spec.stack([spec.decode(r) for r in d.train[:n]])
    return spec, spec.init(4), host


def _same_pairs(a, b, *, rtol):
    (va, ua), (vb, ub) = a, b
    np.testing.assert_allclose(va, vb, rtol=rtol)
    np.testing.assert_allclose(np.abs(np.sum(ua * ub, axis=1)), 1.0, atol=10 * rtol)


def test_device_basis_through_the_curvature_operator():
    """basis="device" calls the operator's on-device product (no host round trip) and gives the host's pairs."""
    spec, params, host = _sample()
    op = CurvatureOperator(spec, params, micro_batch=7)
    calls = {"host": 0, "device": 0}
    base = make_matvec(spec, params, BatchSource(host, batch_size=30, fresh=False), operator=op)

    def host_mv(v):
        calls["host"] += 1
        return base(v)

    def dev_mv(v):
        calls["device"] += 1
        assert not isinstance(v, np.ndarray)  # a device array goes in ...
        out = base.on_device(v)
        assert not isinstance(out, np.ndarray)  # ... and one comes out
        return out

    host_mv.on_device = dev_mv
    p = ravel_pytree(params)[0].size
    res_h = arnoldi.arnoldi(host_mv, num_iters=25, dim=p, seed=0, basis="host")
    assert calls == {"host": 25, "device": 0}
    res_d = arnoldi.arnoldi(host_mv, num_iters=25, dim=p, seed=0, basis="device")
    assert calls == {"host": 25, "device": 25} and res_d.basis_kind == "device"
    _same_pairs(arnoldi.distill(res_d, top_k=5), arnoldi.distill(res_h, top_k=5), rtol=1e-5)
    assert op.trace_count == 1  # the host and the device product share the one compiled step


def test_compute_eigensystem_device_basis_matches_host():
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem

    spec, params, host = _sample(48, seed=3)
    common = dict(num_iters=40, top_k=5, batch_size=48, fresh_batches=False, micro_batch=16, sample_size=48,
                  residuals=False, seed=1)
    h = compute_eigensystem(spec, params, host, EigensystemArgs(basis="host", **common))
    d = compute_eigensystem(spec, params, host, EigensystemArgs(basis="device", **common))
    assert h.args["basis_used"] == "host" and d.args["basis_used"] == "device"
    assert h.args["devices_used"] == 1
    np.testing.assert_allclose(d.ritz_values, h.ritz_values, rtol=1e-5)
    with pytest.raises(ValueError, match="basis"):
        EigensystemArgs(basis="gpu")
    with pytest.raises(ValueError, match="basis_path"):
        EigensystemArgs(basis="mmap")
    with pytest.raises(ValueError, match="devices"):
        EigensystemArgs(devices=-1)


def test_resolve_devices_errors():
    assert len(resolve_devices(None)) == len(resolve_devices(0)) >= 1
    with pytest.raises(ValueError, match="local device"):
        resolve_devices(99)
    with pytest.raises(ValueError, match="empty"):
        resolve_devices([])


_MULTI = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from beam_influence.core import arnoldi
    from beam_influence.core.curvature import BatchSource, CurvatureOperator, make_matvec
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem
    from beam_influence.models import digits

    assert len(jax.devices()) == 4, jax.devices()
    out = {"devices": len(jax.devices())}
    d = digits.load_digits(seed=2)
    for curvature in ("hessian", "ggn"):
        spec = digits.mlp(hidden=6, l2=1e-2)
        host = spec.stack([spec.decode(r) for r in d.train[:30]])
        params = spec.init(4)
        for D in (1, 4):
            op = CurvatureOperator(spec, params, curvature=curvature, micro_batch=4, devices=D)
            mv = make_matvec(spec, params, BatchSource(host, batch_size=30, fresh=False), operator=op)
            mb, w = next(op.micro_batches(host))
            placed = jax.device_put(mb, op._batch_sharding)["x"]
            for basis in (("host", "device") if curvature == "hessian" and D == 4 else ("host",)):
                res = arnoldi.arnoldi(mv, num_iters=25, dim=op.dim, seed=0, basis=basis)
                vals, vecs = arnoldi.distill(res, top_k=5)
                out[f"{curvature}/{D}/{basis}"] = {
                    "vals": vals.tolist(), "vecs": vecs.tolist(), "traces": op.trace_count,
                    "rows_per_step": op.rows_per_step, "shards": len(placed.addressable_shards),
                    "shard_rows": sorted({int(s.data.shape[0]) for s in placed.addressable_shards})}
    spec = digits.logreg(l2=1e-2)
    host = spec.stack([spec.decode(r) for r in d.train[:48]])
    for D in (1, 4):
        args = EigensystemArgs(num_iters=40, top_k=5, batch_size=48, fresh_batches=False, micro_batch=5,
                               sample_size=48, residuals=True, seed=2, devices=D, basis="device", mass_sample=0)
        es = compute_eigensystem(spec, spec.init(1), host, args)
        out[f"es/{D}"] = {"ritz": es.ritz_values.tolist(), "resid": es.residuals.tolist(),
                          "devices_used": es.args["devices_used"], "basis_used": es.args["basis_used"],
                          "micro_batch_used": es.args["micro_batch_used"]}
    json.dump(out, sys.stdout)
''')


@pytest.fixture(scope="module")
def four_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", _MULTI], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_four_virtual_devices_give_the_one_device_ritz_pairs(four_devices, curvature):
    out = four_devices
    assert out["devices"] == 4
    ref = out[f"{curvature}/1/host"]
    keys = [f"{curvature}/4/host"] + ([f"{curvature}/4/device"] if curvature == "hessian" else [])
    for key in keys:
        got = out[key]
        _same_pairs((np.array(got["vals"]), np.array(got["vecs"])), (np.array(ref["vals"]), np.array(ref["vecs"])),
                    rtol=1e-5)
    four = out[f"{curvature}/4/host"]
    assert four["shards"] == 4 and four["shard_rows"] == [4]  # each device holds its own micro-batch of 4 rows
    assert four["rows_per_step"] == 16 and ref["rows_per_step"] == 4
    assert four["traces"] == ref["traces"] == 1  # one compiled (sharded) step for every product


def test_four_virtual_devices_eigensystem(four_devices):
    one, four = four_devices["es/1"], four_devices["es/4"]
    assert one["devices_used"] == 1 and four["devices_used"] == 4
    assert one["basis_used"] == four["basis_used"] == "device"
    assert four["micro_batch_used"] == 5  # min(micro_batch, ⌈48 / 4⌉) rows per device
    np.testing.assert_allclose(four["ritz"], one["ritz"], rtol=1e-5)
    assert max(four["resid"]) < 1e-3 * max(four["ritz"])


# ---- worker contexts: a plan for the device, one model copy per device ---------------------------------
def _save_model(root, k=4):
    from beam_influence.core.estimate import EigensystemArgs, compute_eigensystem

    spec, params, host = _sample(48, seed=3)
    ckpt, eig = os.path.join(root, "ckpt.msgpack"), os.path.join(root, "eig.safetensors")
    spec.save_params(ckpt, params)
    args = EigensystemArgs(num_iters=12, top_k=k, batch_size=48, fresh_batches=False, micro_batch=16,
                           sample_size=48, residuals=False, seed=0)
    compute_eigensystem(spec, params, host, args).save(eig)
    return ckpt, eig, host


def _ref(ckpt, eig, **kw):
    from beam_influence.beam.resources import ModelRef

    return ModelRef(spec="beam_influence.models.digits:mlp", checkpoint=ckpt, eigensystem=eig,
                    spec_args=json.dumps({"hidden": 6, "l2": 1e-2}), **kw)


def test_auto_plan_in_the_worker_context(tmp_path):
    ckpt, eig, host = _save_model(str(tmp_path))
    auto = _ref(ckpt, eig, method="auto").load()
    assert auto.plan.method == "leafwise" and auto.plan.compute_dtype is None  # CPU, k = 4 < 64
    assert auto.plan.micro_batch == 64 and auto.projector.micro_batch == 64
    assert auto.device_batch_size() == 64 and auto.device_batch_size(100) == 128 and auto.device_batch_size(10) == 10
    assert len(auto.devices) == 1 and auto.projector.__class__.__name__ == "Projector"  # one device: no wrapper
    given = _ref(ckpt, eig, method="flat", micro_batch=8).load()
    assert given.plan[:3] == ("flat", 8, None)
    batch = {k: v[:16] for k, v in host.items()}
    a = np.asarray(auto.projector(auto.params, batch).projections)
    b = np.asarray(given.projector(given.params, batch).projections)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max())
    auto.projector(auto.params, {k: v[16:32] for k, v in host.items()})
    assert auto.projector.cache_size() == 1
    with pytest.raises(ValueError, match="local device"):
        _ref(ckpt, eig, devices=3).load()


_WORKER = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, "tests")
    from test_accelerator import _ref
    from beam_influence.beam.project import DecodedChunk, ProjectionModelHandler
    import pyarrow as pa

    ckpt, eig = sys.argv[1], sys.argv[2]
    host = dict(np.load(sys.argv[3]))
    out = {}
    for devices in (1, 0):
        ref = _ref(ckpt, eig, method="auto", devices=devices)
        ctx = ref.load()
        direct = [ctx.projector(ctx.params, {k: v[s:s + 8] for k, v in host.items()}) for s in range(0, 48, 8)]
        placed = [str(next(iter(o.projections.devices()))) for o in direct]
        chunk = DecodedChunk("mem", 0, 48, np.array([f"r{i}" for i in range(48)]), host, pa.table({}))
        table = ProjectionModelHandler(ref, 8).project(chunk, ctx).table
        proj = np.asarray(table.column("projection").combine_chunks().flatten()).reshape(48, -1)
        out[str(devices)] = {"devices": len(ctx.devices), "placed": placed, "cache": ctx.projector.cache_size(),
                             "proj": proj.tolist(), "replicas": len(getattr(ctx.projector, "replicas", [1]))}
    json.dump(out, sys.stdout)
''')


def test_one_model_copy_per_device_four_virtual_devices(tmp_path):
    ckpt, eig, host = _save_model(str(tmp_path))
    data = str(tmp_path / "host.npz")
    np.savez(data, **host)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", _WORKER, ckpt, eig, data], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout)
    one, four = out["1"], out["0"]
    assert one["devices"] == 1 and four["devices"] == 4 and four["replicas"] == 4
    assert len(set(one["placed"])) == 1
    assert four["placed"][:4] == sorted(set(four["placed"])) and len(set(four["placed"])) == 4  # in turn, 0..3
    assert four["cache"] == 4  # one executable per device for the batch shape, none added by later batches
    np.testing.assert_allclose(np.array(four["proj"]), np.array(one["proj"]), rtol=1e-5, atol=1e-7)


# ---- the GPU recipes (no Kubernetes or Docker here: the manifests are checked as data) -------------------
def test_flink_gpu_manifest_gives_each_taskmanager_one_gpu_and_the_cuda_image():
    import yaml

    k8s = os.path.join(ROOT, "docker", "flink-k8s")
    with open(os.path.join(k8s, "flink-deployment.yaml")) as f:
        (cpu,) = list(yaml.safe_load_all(f))
    with open(os.path.join(k8s, "flink-deployment-gpu.yaml")) as f:
        (gpu,) = list(yaml.safe_load_all(f))
    with open(os.path.join(k8s, "beam-job-server.yaml")) as f:
        js = {d["kind"]: d for d in yaml.safe_load_all(f)}
    assert gpu["kind"] == "FlinkDeployment" and gpu["metadata"]["name"] == cpu["metadata"]["name"]
    assert gpu["spec"]["image"] == cpu["spec"]["image"] and gpu["spec"]["flinkVersion"] == cpu["spec"]["flinkVersion"]
    assert gpu["spec"]["flinkConfiguration"]["taskmanager.numberOfTaskSlots"] == "1"  # one SDK process per GPU
    pod = gpu["spec"]["taskManager"]["podTemplate"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    pool = containers["beam-worker-pool"]
    assert pool["image"].endswith("/beam-influence-worker-cuda:0.1.0")
    assert pool["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in (containers["flink-main-container"].get("resources") or {}).get("limits", {})
    assert {e["name"]: e["value"] for e in pool["env"]}["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert pool["args"] == ["--worker_pool"] and pool["ports"][0]["containerPort"] == 50000
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    claim = js["PersistentVolumeClaim"]["metadata"]["name"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]] == [claim]
    server = js["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert f"--flink-master={gpu['metadata']['name']}-rest:8081" in server["args"]


def test_dataflow_gpu_recipe_runs_one_sdk_process_per_vm():
    text = open(os.path.join(ROOT, "docker", "flex_template", "launch.sh")).read()
    assert "worker_accelerator=type:${GPU_TYPE};count:1;install-nvidia-driver" in text
    assert "no_use_multiple_sdk_containers" in text  # one JAX process owns the VM's GPU
    cuda = open(os.path.join(ROOT, "docker", "Dockerfile.cuda")).read()
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in cuda and "requirements-cuda.txt" in cuda
