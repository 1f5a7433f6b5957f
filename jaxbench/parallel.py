"""Data parallelism on JAX's own runtime: a 1-D device mesh, `NamedSharding`, `jax.distributed`.

The batch is split over the mesh's `data` axis, the rest replicated, and XLA inserts the
all-reduces, so BN statistics stay global unless `bn_sync="local"`. Across processes the
mesh spans every process's devices; only process 0 writes outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbench.configs import Config, check_wait

DATA = "data"  # the mesh axis the batch is split over

# Simulated CPU devices share the cores, so one can fall behind at a collective by more than
# XLA:CPU's 40 s default, which kills the process: give them ten minutes unless set.
_FORCED = "--xla_force_host_platform_device_count"
_PATIENCE = "--xla_cpu_collective_call_terminate_timeout_seconds"
if _FORCED in os.environ.get("XLA_FLAGS", "") and _PATIENCE not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_PATIENCE}=600"

# How long process startup may take before a missing peer or coordinator is an error.
DEFAULT_TIMEOUT_S = 60
MAX_PROCESSES = 4096  # --num-processes: hosts (or GPUs) of one run


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where one run's program executes: its mesh (None: one device, nothing sharded)."""

    mesh: Mesh | None
    devices: int  # devices of the whole run, over every process
    processes: int
    process_index: int

    @classmethod
    def single(cls) -> Topology:
        return cls(None, 1, 1, 0)

    @property
    def replicated(self) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, P())

    @property
    def batch_split(self) -> NamedSharding | None:
        """Axis 0 (the images of a batch) split over the devices."""
        return None if self.mesh is None else NamedSharding(self.mesh, P(DATA))


def local_devices(cfg: Config) -> int:
    """The devices per process the config asks for, checked against what there is."""
    have = jax.local_device_count()
    want = cfg.devices or have
    if want > have:
        raise ValueError(
            f"--devices {want}: this process sees {have} {jax.default_backend()} device(s); "
            "lower --devices (on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
            "simulates N devices)"
        )
    return want


def resolve(cfg: Config) -> Config:
    """`cfg` with `devices` set to the per-process count it will run on (0 resolved)."""
    n = local_devices(cfg)
    return cfg if cfg.devices == n else cfg.replace(devices=n)


def global_devices(cfg: Config) -> int:
    """Devices of the whole run: per-process devices times processes."""
    return local_devices(cfg) * jax.process_count()


def bn_shards(cfg: Config) -> int:
    """How many separately normalised shares a training batch has (1: global statistics)."""
    return global_devices(cfg) if cfg.bn_sync == "local" else 1


def check_batch(cfg: Config, devices: int) -> None:
    """One-line errors for batches that do not split evenly over `devices`."""
    if devices <= 1:
        return
    for name in ("batch_size", "eval_batch_size"):
        size = getattr(cfg, name)
        if size % devices:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {size} does not split over {devices} devices: "
                f"use a multiple of {devices} or change --devices"
            )
    share = cfg.batch_size // devices
    if cfg.bn_sync == "local" and cfg.ghost_bn and share > cfg.ghost_bn and share % cfg.ghost_bn:
        raise ValueError(
            f"--bn-sync local: each device's {share} images do not split into ghost batches "
            f"of {cfg.ghost_bn}; change --ghost-bn or --devices"
        )


def topology(cfg: Config) -> Topology:
    """The mesh for `cfg` (None for a single device in a single process)."""
    local = local_devices(cfg)
    processes = jax.process_count()
    total = local * processes
    check_batch(cfg, total)
    if total == 1:
        return Topology.single()
    if processes == 1:
        devices = jax.local_devices()[:local]
    else:  # the first `local` devices of every process, in process order
        devices = []
        for p in range(processes):
            own = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
            devices += own[:local]
    return Topology(Mesh(np.array(devices), (DATA,)), total, processes, jax.process_index())


def replicate(tree: Any, topo: Topology) -> Any:
    """Host or device arrays copied to every device of the mesh; across processes each
    supplies its own copy, so nothing crosses the network."""
    if topo.mesh is None:
        return jax.device_put(tree)
    sharding = topo.replicated
    if topo.processes == 1:
        return jax.device_put(tree, sharding)

    def put(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree)


def split_batch(tree: Any, sharding: NamedSharding | None) -> Any:
    """Inside a jitted function: lay a batch's leading axis over the devices."""
    return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding)


def fetch(tree: Any) -> Any:
    """Replicated results to the host, in any process (each reads its own copy)."""

    def get(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return jax.device_get(x)

    return jax.tree_util.tree_map(get, tree)


@dataclasses.dataclass(frozen=True)
class ProcessArgs:
    """How this process joins a multi-process run (all None: a single process)."""

    coordinator: str | None = None  # HOST:PORT of process 0
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False  # let `jax.distributed.initialize()` read the cluster (SLURM, ...)
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None

    @property
    def several(self) -> bool:
        """Whether these flags start more than one process."""
        return (self.explicit and (self.num_processes or 1) > 1) or self.auto


def check_process_args(a: ProcessArgs) -> None:
    """One-line errors for a topology that cannot start, before anything waits on it."""
    given = [a.coordinator is not None, a.num_processes is not None, a.process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "a multi-process run needs all of --coordinator HOST:PORT, --num-processes P "
            "and --process-id I (or --distributed to read them from the cluster)"
        )
    if a.auto and a.explicit:
        raise ValueError("--distributed reads the topology from the cluster; drop --coordinator")
    check_wait(a.timeout_s)
    if not a.explicit:
        return
    host, _, port = a.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {a.coordinator!r}: give HOST:PORT, e.g. node0:12355")
    if not 1 <= a.num_processes <= MAX_PROCESSES:
        raise ValueError(f"--num-processes must be in [1, {MAX_PROCESSES}], got {a.num_processes}")
    if not 0 <= a.process_id < a.num_processes:
        raise ValueError(
            f"--process-id {a.process_id} is out of range for --num-processes "
            f"{a.num_processes}: use 0 .. {a.num_processes - 1}"
        )


def _call_the_roll(a: ProcessArgs, port: int, deadline: float) -> None:
    """Process 0: wait for every other id, then release them together."""
    try:
        server = socket.create_server(("", port), reuse_port=hasattr(socket, "SO_REUSEPORT"))
    except OSError as e:
        raise ValueError(
            f"--coordinator {a.coordinator}: process 0 cannot listen on port {port} "
            f"({e.strerror or e}); pick a free port"
        ) from None
    seen: set[int] = set()
    conns: list[socket.socket] = []
    with server, contextlib.ExitStack() as open_conns:  # every connection closed at the end
        while len(seen) < a.num_processes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(1, a.num_processes)) - seen)
                raise TimeoutError(
                    f"process(es) {', '.join(map(str, missing))} did not reach "
                    f"{a.coordinator} within {a.timeout_s} s; start them with the same "
                    "--coordinator and --num-processes (or raise --dist-timeout)"
                )
            server.settimeout(left)
            try:
                conn = open_conns.enter_context(server.accept()[0])
            except TimeoutError:
                continue
            conn.settimeout(max(deadline - time.monotonic(), 0.1))
            try:
                line = conn.recv(64).decode().split()
            except (OSError, UnicodeDecodeError):
                line = []
            if len(line) != 2 or not all(s.isdigit() for s in line):
                conn.close()  # the caller tries again
                continue
            pid, count = int(line[0]), int(line[1])
            if count != a.num_processes or pid in seen or not 0 < pid < a.num_processes:
                conn.sendall(b"no\n")
                why = f"two processes say --process-id {pid}"
                if count != a.num_processes:
                    why = f"process {pid} says --num-processes {count}"
                raise ValueError(f"inconsistent topology: {why}; give every process its own id")
            seen.add(pid)
            conns.append(conn)
        for c in conns:  # everyone is here: release them together
            c.sendall(b"ok\n")


def _answer_the_roll(a: ProcessArgs, host: str, port: int, deadline: float) -> None:
    """Any other process: report to process 0 until it answers or the deadline passes."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"cannot reach the coordinator {a.coordinator} within {a.timeout_s} s: start "
                "process 0 there, check the address and firewall (or raise --dist-timeout)"
            )
        try:
            with socket.create_connection((host, port), timeout=min(left, 5.0)) as conn:
                conn.sendall(f"{a.process_id} {a.num_processes}\n".encode())
                conn.settimeout(max(deadline - time.monotonic(), 0.1))
                reply = conn.recv(16)
        except socket.gaierror:
            raise ValueError(f"--coordinator {a.coordinator}: unknown host {host!r}") from None
        except (TimeoutError, ConnectionRefusedError, ConnectionResetError):
            reply = b""
        if reply.startswith(b"ok"):
            return
        if reply.startswith(b"no"):
            raise ValueError(
                f"the coordinator refused process {a.process_id}: another process has this id "
                "or a different --num-processes"
            )
        time.sleep(0.2)  # not up yet, or gone mid-call: try again until the deadline


def initialize(a: ProcessArgs) -> None:
    """Join the run's processes (`jax.distributed.initialize`) before JAX touches a device;
    nothing for one process."""
    check_process_args(a)
    if not a.several:
        return
    # CPU processes exchange collectives over gloo (GPUs use NCCL whatever this says)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if a.explicit:
        # A TCP roll call on the coordinator's port first: `jax.distributed.initialize` aborts
        # the interpreter when a peer never appears; this fails with one line in the timeout.
        host, _, port = a.coordinator.rpartition(":")
        deadline = time.monotonic() + a.timeout_s
        if a.process_id == 0:
            _call_the_roll(a, int(port), deadline)
        else:
            _answer_the_roll(a, host.strip("[]"), int(port), deadline)
        jax.distributed.initialize(
            a.coordinator, a.num_processes, a.process_id, initialization_timeout=a.timeout_s
        )
    else:
        jax.distributed.initialize(initialization_timeout=a.timeout_s)


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a multi-process run (`python -m jaxbench.train`)."""
    dist = parser.add_argument_group(
        "several processes (docs/scaling.md)",
        "One process per host (or per GPU), all started with the same flags but "
        "--process-id; the batch is split over every process's devices and process 0 "
        "writes the outputs.",
    )
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    dist.add_argument(
        "--num-processes", type=int, default=None, metavar="P", help=f"1 .. {MAX_PROCESSES}"
    )
    dist.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. P - 1")
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="read the topology from the cluster (SLURM, Open MPI, or the JAX_COORDINATOR_"
        "ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) via jax.distributed",
    )
    dist.add_argument(
        "--dist-timeout",
        type=int,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for every process to arrive before giving up with an error",
    )


def join_processes(args: argparse.Namespace) -> None:
    """Start JAX's multi-process runtime when the flags ask for it; afterwards every
    process but 0 trains without writing or printing. Raises ValueError/TimeoutError."""
    pa = ProcessArgs(
        args.coordinator, args.num_processes, args.process_id, args.distributed, args.dist_timeout
    )
    check_process_args(pa)
    single_only = args.resume is not None or getattr(args, "checkpoint_every", 0)
    if pa.several and (single_only or args.vmap_seeds != 1):
        raise ValueError(
            "--resume, --checkpoint-every and --vmap-seeds run in a single process; "
            "drop them from a multi-process run"
        )
    initialize(pa)
    if jax.process_index() != 0:
        args.out, args.quiet, args.no_progress, args.profile = None, True, True, None
