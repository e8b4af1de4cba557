r"""Memory plans: every buffer of size p (or n·p, k·p, m·p) a stage will hold, counted before any work.

A plan names each buffer with its bytes and where it lives — ``"host"`` (RAM), ``"device"`` (accelerator
memory; on the CPU backend the device *is* the host) or ``"disk"`` (a memory-mapped file) — picks what the
stage can choose (the Krylov basis placement, the projection micro-batch m) so that the total fits the free
memory, prints itself in one line, and refuses with the number and the fix when nothing fits.

The floors the plans are measured against (``benchmarks/large_model.py``; issue 18), with 4-byte floats:

* eigensystem: :math:`(n + 1 + 6)\,p\cdot 4` bytes + 1 GiB — the basis Q [n+1, p], six p-sized arrays
  (θ, the vector v on the device, the product's accumulator, w in float64 (two), one scratch row), the runtime;
* index / query / self-influence / fused: :math:`(k + m + 5)\,p\cdot 4` bytes + 1 GiB — U [k, p] once, m
  per-example gradients, five p-sized arrays (θ and the gradient step's work), the runtime.

Pure numpy/stdlib (the device query takes a JAX device object but imports nothing).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

GIB = 1 << 30
RUNTIME_BYTES = GIB  # interpreter, JAX/XLA runtime, compiled executables, Beam: measured 0.6–0.9 GiB here
EIGENSYSTEM_P_ARRAYS = 6  # θ, v (device), the accumulator, w (float64: two), one scratch row
PROJECTION_P_ARRAYS = 5  # θ, the gradient step's own work (backward pass of one example at a time, summed)
HEADROOM = 0.9  # a plan uses at most this fraction of the free memory it sees (other processes move too)
PLACES = ("host", "device", "disk")


class MemoryPlanError(ValueError):
    """Nothing fits: the message names the stage, the bytes needed and free, and the fix."""


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One thing a stage holds: ``bytes`` in ``place`` (host, device or disk)."""

    name: str
    bytes: int
    place: str = "host"

    def __post_init__(self):
        if self.place not in PLACES:
            raise ValueError(f"place must be one of {PLACES}, got {self.place!r}")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What a stage will hold, and what it chose so that it fits.

    ``host_free`` / ``device_free``: the free bytes seen when planning (None: unknown; ``device_free`` is
    None on the CPU backend, where "device" buffers are host memory). ``choices``: what the plan picked
    (basis placement, micro-batch, ...). ``floor``: the issue-18 floor for this stage, for the ratio.
    """

    stage: str
    p: int
    buffers: tuple[Buffer, ...]
    platform: str = "cpu"
    host_free: int | None = None
    device_free: int | None = None
    choices: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    floor: int = 0

    def bytes_in(self, place: str) -> int:
        """Bytes held in ``place``; on the CPU backend device buffers count as host memory."""
        if place == "host" and self.platform == "cpu":
            return sum(b.bytes for b in self.buffers if b.place in ("host", "device"))
        if place == "device" and self.platform == "cpu":
            return 0
        return sum(b.bytes for b in self.buffers if b.place == place)

    @property
    def host_bytes(self) -> int:
        return self.bytes_in("host")

    @property
    def device_bytes(self) -> int:
        return self.bytes_in("device")

    def shortfall(self) -> dict[str, int]:
        """Bytes over the usable free memory per place (empty when the plan fits)."""
        out = {}
        for place, free in (("host", self.host_free), ("device", self.device_free)):
            need = self.bytes_in(place)
            if free is not None and need > usable(free):
                out[place] = need - usable(free)
        return out

    @property
    def fits(self) -> bool:
        return not self.shortfall()

    def line(self) -> str:
        """One line: ``plan <stage>: p=…, choices; host X of Y free (the biggest buffers); device …``."""
        head = ", ".join(f"{k}={v}" for k, v in self.choices.items())
        parts = [f"plan {self.stage}: p={self.p:,}" + (f", {head}" if head else "")]
        for place, free in (("host", self.host_free), ("device", self.device_free)):
            need = self.bytes_in(place)
            if not need and place == "device":
                continue
            big = sorted((b for b in self.buffers if (b.place == place or (
                place == "host" and self.platform == "cpu" and b.place == "device"))),
                key=lambda b: -b.bytes)[:4]
            what = ", ".join(f"{b.name} {fmt_bytes(b.bytes)}" for b in big)
            of = f" of {fmt_bytes(free)} free" if free is not None else ""
            parts.append(f"{place} {fmt_bytes(need)}{of} ({what})")
        disk = self.bytes_in("disk")
        if disk:
            parts.append(f"disk {fmt_bytes(disk)}")
        if self.floor:
            parts.append(f"floor {fmt_bytes(self.floor)}")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        """JSON-able record (the eigensystem's args and the index manifest keep it)."""
        return {"line": self.line(), "stage": self.stage, "p": self.p, "platform": self.platform, "host_bytes": self.host_bytes,
                "device_bytes": self.device_bytes, "disk_bytes": self.bytes_in("disk"),
                "host_free": self.host_free, "device_free": self.device_free, "floor_bytes": self.floor,
                "choices": dict(self.choices),
                "buffers": [dataclasses.asdict(b) for b in self.buffers]}


def usable(free: int) -> int:
    return int(HEADROOM * free)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if n >= GIB // 4 else f"{n / (1 << 20):.0f} MiB"


# ---- what is free ------------------------------------------------------------------------------
def host_free_bytes() -> int | None:
    """Available host memory: /proc/meminfo MemAvailable, capped by a cgroup (v2 or v1) limit; None if unknown."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for limit_path, used_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            with open(used_path) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            room = max(int(raw) - used, 0)
            free = room if free is None else min(free, room)
        break
    return free


def device_memory(device: Any = None) -> dict | None:
    """``{"limit", "in_use", "free"}`` bytes of a JAX device (default: the first local one); None when the
    backend reports no memory statistics (the CPU backend)."""
    if device is None:
        import jax

        device = jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the query raise
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    limit, used = int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
    return {"limit": limit, "in_use": used, "free": max(limit - used, 0)}


# ---- the floors --------------------------------------------------------------------------------
def eigensystem_floor(p: int, n: int) -> int:
    """(n + 1 + 6)·p·4 + 1 GiB."""
    return (int(n) + 1 + EIGENSYSTEM_P_ARRAYS) * int(p) * 4 + RUNTIME_BYTES


def projection_floor(p: int, k: int, m: int) -> int:
    """(k + m + 5)·p·4 + 1 GiB."""
    return (int(k) + int(m) + PROJECTION_P_ARRAYS) * int(p) * 4 + RUNTIME_BYTES


# ---- the eigensystem ---------------------------------------------------------------------------
def plan_eigensystem(*, p: int, num_iters: int, top_k: int, basis: str = "auto", basis_path: str | None = None,
                     basis_itemsize: int = 4, param_itemsize: int = 4, sample_bytes: int = 0,
                     platform: str = "cpu", host_free: int | None = None, device_free: int | None = None,
                     device_limit: int | None = None, devices: int = 1) -> MemoryPlan:
    """The eigensystem's plan: basis Q [(n+1), p] placed on the device when it fits beside the operator (an
    accelerator), else in host RAM, else memory-mapped (``basis_path``); the Ritz vectors are formed in place
    in the basis rows (``arnoldi.distill(overwrite_basis=True)``), so U costs nothing extra.

    Raises ``MemoryPlanError`` naming the fix when no placement fits.
    """
    if basis not in ("auto", "device", "host", "mmap"):
        raise ValueError(f"basis must be auto, device, host or mmap, got {basis!r}")
    n, p = int(num_iters), int(p)
    q_bytes = (n + 1) * p * basis_itemsize
    accel = platform != "cpu"
    op_place = "device" if accel else "host"
    fixed = [Buffer("θ", p * param_itemsize, op_place),
             Buffer("operator vectors (v, accumulator)", 2 * p * 4, op_place),
             Buffer("w (float64) + scratch row", 3 * p * 4, "host"),
             Buffer("curvature sample", int(sample_bytes), "host"),
             Buffer("runtime", RUNTIME_BYTES, "host")]
    if devices > 1:  # θ and the vectors on every device
        fixed += [Buffer(f"θ + vectors on {devices - 1} more device(s)", (devices - 1) * 3 * p * 4, "device")]

    def with_basis(place: str) -> MemoryPlan:
        where = {"device": "device", "host": "host", "mmap": "disk"}[place]
        bufs = (Buffer(f"basis Q [{n + 1}, p]", q_bytes, where), *fixed)
        if place == "mmap":  # one row read/written at a time, plus the page cache the kernel may drop
            bufs += (Buffer("basis rows in flight", 2 * p * basis_itemsize, "host"),)
        return MemoryPlan("eigensystem", p, tuple(bufs), platform, host_free, device_free,
                          {"n": n, "k": int(top_k), "basis": place}, eigensystem_floor(p, n))

    if basis == "mmap" and not basis_path:
        raise MemoryPlanError("--basis mmap needs --basis_path FILE (the .npy file that holds the basis)")
    order = {"auto": (["device"] if accel else []) + ["host"] + (["mmap"] if basis_path else []),
             "device": ["device"], "host": ["host"], "mmap": ["mmap"]}[basis]
    plans = [with_basis(b) for b in order]
    for plan in plans:
        if plan.fits:
            return plan
    plan = plans[-1] if basis != "auto" else (plans[1] if accel and len(plans) > 1 else plans[0])
    raise MemoryPlanError(_eigensystem_fix(plan, basis, basis_path, p, n))


def _eigensystem_fix(plan: MemoryPlan, basis: str, basis_path: str | None, p: int, n: int) -> str:
    short = plan.shortfall()
    place = "host" if "host" in short else "device"
    free = plan.host_free if place == "host" else plan.device_free
    fixes = []
    if plan.choices.get("basis") != "mmap":
        fixes.append("--basis mmap --basis_path FILE.npy (the basis on disk)")
    step = p * 4
    fewer = max(0, n - -(-short[place] // step))
    if fewer >= 1:
        fixes.append(f"--num_iters {fewer} or fewer (each Arnoldi step holds one more p-vector: {fmt_bytes(step)})")
    if plan.platform != "cpu" and plan.choices.get("basis") == "device":
        fixes.append("--basis host")
    fixes.append("a machine with more memory")
    return (f"the eigensystem needs {fmt_bytes(plan.bytes_in(place))} of {place} memory at p={p:,}, n={n} "
            f"(basis {fmt_bytes((n + 1) * p * 4)}), {fmt_bytes(free)} free: use " + ", or ".join(fixes)
            + f". Plan: {plan.line()}")


# ---- the projection stages ---------------------------------------------------------------------
def plan_projection(stage: str, *, p: int, k: int, per_example_bytes_per_param: int, max_micro_batch: int,
                    micro_batch: int | None = None, u_itemsize: int = 4, param_itemsize: int = 4,
                    query_directions: int = 0, sketch_bytes: int = 0, platform: str = "cpu",
                    host_free: int | None = None, device_free: int | None = None, devices: int = 1,
                    u_on_host_too: bool = False, extra: Sequence[Buffer] = ()) -> MemoryPlan:
    """A projecting stage's plan (index, query, fused; self-influence holds no U): U [k, p] once on the
    device (plus ``query_directions`` exact-complement test gradients beside it), θ, m per-example gradients
    of ``per_example_bytes_per_param`` bytes per parameter each, the gradient step's own p-sized work and the
    runtime, and the ``extra`` buffers of the stage (``kfac_buffers``); m is the largest power of two ≤
    ``max_micro_batch`` that fits (or ``micro_batch`` as given).

    Raises ``MemoryPlanError`` with the fix when not even m = 1 fits.
    """
    p, k = int(p), int(k)
    accel = platform != "cpu"
    dev = "device" if accel else "host"
    directions = k + int(query_directions)
    fixed = [Buffer(f"U [{k}, p]" + (f" + {query_directions} query gradients" if query_directions else ""),
                    directions * p * u_itemsize, dev),
             Buffer("θ", p * param_itemsize, dev),
             Buffer("gradient step work", (PROJECTION_P_ARRAYS - 1) * p * 4, dev),
             Buffer("gradient sketch", int(sketch_bytes), dev),
             Buffer("runtime", RUNTIME_BYTES, "host"), *extra]
    if accel and u_on_host_too:
        fixed.append(Buffer("U staged on the host", directions * p * 4, "host"))
    if devices > 1:
        fixed.append(Buffer(f"U + θ on {devices - 1} more device(s)", (devices - 1) * (directions + 1) * p * 4,
                            "device"))

    def with_m(m: int) -> MemoryPlan:
        bufs = (*fixed, Buffer(f"{m} per-example gradients", m * per_example_bytes_per_param * p, dev))
        return MemoryPlan(stage, p, tuple(bufs), platform, host_free, device_free,
                          {"k": k, "micro_batch": m}, projection_floor(p, k + int(query_directions), m))

    if micro_batch is not None:
        plan = with_m(int(micro_batch))
        if not plan.fits:
            raise MemoryPlanError(_projection_fix(plan, k, p, query_directions, given=True))
        return plan
    m = max(1, int(max_micro_batch))
    while True:
        plan = with_m(m)
        if plan.fits:
            return plan
        if m == 1:
            raise MemoryPlanError(_projection_fix(plan, k, p, query_directions, given=False))
        m = 1 << ((m - 1).bit_length() - 1)


def kfac_buffers(*, p: int, k: int, factor_bytes: int, platform: str = "cpu",
                 in_projector: bool = True) -> tuple[Buffer, ...]:
    """What a worker that forms K-FAC self-terms or whitened sketches holds beside the projector
    (``core.kfac.Complement`` and its ``WhitenedTerms``): U once more as stored (float32, host), the float32
    W = D^{-1/2}QᵀU on the device (and U there too when the terms are not computed inside the projector,
    ``in_projector=False``: the jvp projector forms no gradients, so the Complement's own step does), the factors
    as loaded (float64 tensors, ``factor_bytes``, host) and their float32 bases and D^{-1/2} on the device (at most
    half the factors + p)."""
    dev = "device" if platform != "cpu" else "host"
    p, k = int(p), int(k)
    step = (Buffer(f"K-FAC terms: W [{k}, p] float32", k * p * 4, dev) if in_projector else
            Buffer(f"K-FAC step: U and W [{k}, p] float32", 2 * k * p * 4, dev))
    return (Buffer(f"K-FAC: U [{k}, p] held by the complement", k * p * 4, "host"), step,
            Buffer("K-FAC factors (float64)", int(factor_bytes), "host"),
            Buffer("K-FAC step: bases and D^-1/2 (float32)", int(factor_bytes) // 2 + p * 4, dev))


def query_block_size(num_queries: int, *, p: int, k: int, platform: str = "cpu", host_free: int | None = None,
                     device_free: int | None = None, micro_batch: int = 8) -> int:
    """The most exact-scoring query gradients a projecting worker holds beside U at once (``≤ num_queries``):
    the projection plan with them and ``micro_batch`` per-example gradients fits, and the block itself takes at
    most a quarter of the free memory (the launcher holds it too while writing it). ``MemoryPlanError`` when
    not even one query fits."""
    q = max(1, int(num_queries))
    free = device_free if platform != "cpu" else host_free
    if free is not None:
        q = max(1, min(q, usable(free) // 4 // (4 * int(p))))

    def fits(n: int) -> bool:
        try:
            plan_projection("exact scoring", p=p, k=k, per_example_bytes_per_param=4, max_micro_batch=micro_batch,
                            micro_batch=micro_batch, query_directions=n, platform=platform, host_free=host_free,
                            device_free=device_free)
            return True
        except MemoryPlanError:
            return False

    if fits(q):
        return q
    if not fits(1):
        plan_projection("exact scoring", p=p, k=k, per_example_bytes_per_param=4, max_micro_batch=1, micro_batch=1,
                        query_directions=1, platform=platform, host_free=host_free, device_free=device_free)
    lo, hi = 1, q  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _projection_fix(plan: MemoryPlan, k: int, p: int, q: int, *, given: bool) -> str:
    short = plan.shortfall()
    place = "host" if "host" in short else "device"
    free = plan.host_free if place == "host" else plan.device_free
    m = plan.choices["micro_batch"]
    fixes = []
    if given and m > 1:
        fixes.append("a smaller --micro_batch (or none: the plan picks the largest that fits)")
    k_fit = k - -(-short[place] // (p * 4))
    if k_fit >= 1 and k_fit < k:
        fixes.append(f"an eigensystem with fewer pairs (--num_eigenpairs {k_fit} or fewer fits)")
    if q:
        fixes.append("--complement sketch (no exact query gradients beside U)")
    if plan.platform != "cpu":
        fixes.append("--compute_dtype bfloat16 (U in half the bytes)")
    fixes.append("a machine with more memory")
    return (f"the {plan.stage} projection needs {fmt_bytes(plan.bytes_in(place))} of {place} memory at p={p:,}, "
            f"k={k}{f' + {q} query gradients' if q else ''}, micro-batch {m} (U alone {fmt_bytes(k * p * 4)}), "
            f"{fmt_bytes(free)} free: use " + ", or ".join(fixes) + f". Plan: {plan.line()}")


__all__ = ["Buffer", "GIB", "MemoryPlan", "MemoryPlanError", "device_memory", "eigensystem_floor", "fmt_bytes",
           "host_free_bytes", "kfac_buffers", "plan_eigensystem", "plan_projection", "projection_floor",
           "query_block_size"]
