"""How was this process started, and how do the ranks find each other?

:func:`detect` reads the environment a launcher left behind and normalises it into one
frozen :class:`LaunchEnv`; it never creates a process group. :meth:`LaunchEnv.export` then
writes the torch ``env://`` variables so that ``torch.distributed.init_process_group`` and
``deepspeed.init_distributed(auto_mpi_discovery=False)`` work the same under every launcher.

Launchers are tried in this order (the first that matches wins):

``torchrun``
    ``RANK`` and ``WORLD_SIZE`` are set (torch elastic also sets ``TORCHELASTIC_RUN_ID``).
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` are required when
    the world has more than one rank; the node rank is ``GROUP_RANK`` (else ``NODE_RANK``).
    This wins over Slurm, so ``srun torchrun ...`` is torchrun. Setting only one of ``RANK``
    and ``WORLD_SIZE`` is an error.

``slurm``
    The process is one task of an ``srun`` job step. Rule: ``SLURM_PROCID`` is set **and**
    ``SLURM_STEP_ID`` (or the legacy ``SLURM_STEPID``) holds a regular step id
    (``< SLURM_MAX_NORMAL_STEP_ID = 0xfffffff0``).

    Why not "``SLURM_PROCID`` and ``SLURM_NTASKS``": the shell that runs an sbatch script is
    itself started by slurmstepd as the special *batch* step, and slurmstepd exports
    ``SLURM_PROCID=0``, ``SLURM_LOCALID=0``, ``SLURM_NODEID=0`` there while sbatch exports
    ``SLURM_NTASKS=N`` (when tasks were requested) -- it looks like rank 0 of N but is a
    single shell that has not launched anything yet. ``SLURM_STEP_ID`` is the reliable difference: srun puts it in the
    environment of every step it launches (``env_array_for_step``) and slurmstepd exports it
    only for non-negative step ids, while the batch step's id (``0xfffffffb``, formerly
    ``0xfffffffe``) is negative as the C ``int`` it is stored in, so the batch shell has
    none. Special ids that might still appear (batch/extern/interactive, >= ``0xfffffff0``)
    are rejected too, so an ``salloc`` interactive-step shell is not a rank either.

    World size: ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``/``SLURM_NPROCS``); local world
    size: this node's entry (``SLURM_NODEID``) of ``SLURM_STEP_TASKS_PER_NODE`` (else
    ``SLURM_TASKS_PER_NODE``, format ``2(x3),1``; else ``SLURM_NTASKS_PER_NODE``). The
    step-level variables are preferred because ``srun --preserve-env`` keeps the
    allocation's ``SLURM_NTASKS``. Master: ``MASTER_ADDR``, else the first host of
    ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``/``SLURM_NODELIST``), which is where
    task 0 runs for block/cyclic/plane distributions (set ``MASTER_ADDR`` for
    ``--distribution=arbitrary``). Port: ``MASTER_PORT``, else ``20000 + SLURM_JOB_ID %
    20000`` so that every task computes the same port without talking to the others (two
    concurrent steps of one job sharing their first node must set ``MASTER_PORT``).

``mpi``
    Open MPI (``OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE``), MPICH/Intel MPI Hydra
    (``PMI_RANK``/``PMI_SIZE``, ``MPI_LOCALRANKID``/``MPI_LOCALNRANKS``), Cray
    (``PMI_LOCAL_RANK``/``PMI_LOCAL_SIZE``) or PMIx (``PMIX_RANK``; its world size comes
    from mpi4py). With more than one rank
    and mpi4py importable, every rank takes part in the same small exchange over
    ``MPI.COMM_WORLD`` (a shared-memory split plus one allgather): it yields the local rank and
    node rank when the launcher did not, and rank 0's ``MASTER_ADDR`` (else rank 0's
    hostname) and ``MASTER_PORT`` (else 29500) for everyone. Deciding to talk by launcher
    facts only (never by whether a user variable is set on *this* rank) keeps ranks from
    deadlocking when Open MPI did not forward ``MASTER_ADDR`` to every node. mpi4py is
    imported lazily, only here. When a process carries both Slurm step variables and MPI
    variables, Slurm is used if they agree on rank and size (``srun --mpi=pmi2/pmix``); if
    they disagree the process was started by ``mpirun`` through srun-launched daemons and
    MPI is used.

``none``
    A single process: rank 0 of 1, master ``127.0.0.1``, port ``MASTER_PORT`` or a free port
    (bound to port 0; call :meth:`LaunchEnv.export` to pin it for later callers).

An inconsistent environment raises :class:`LaunchEnvError` with one line that names the
variable and the fix.

:func:`nccl_env` is the rest of what torch reads from the environment when a process group is
made: how NCCL's watchdog ends a collective that timed out, and where its flight recorder dumps.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LaunchEnv",
    "LaunchEnvError",
    "LAUNCHERS",
    "DEFAULT_MPI_PORT",
    "detect",
    "world_size_hint",
    "expand_hostlist",
    "first_host",
    "parse_tasks_per_node",
    "slurm_port",
    "nccl_env",
    "NCCL_ASYNC_ERROR_HANDLING",
    "FLIGHT_RECORDER_DIR",
]

LAUNCHERS = ("torchrun", "slurm", "mpi", "none")
DEFAULT_MPI_PORT = 29500
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000
# Slurm: step ids at or above SLURM_MAX_NORMAL_STEP_ID are special (pending, extern,
# batch, interactive); only regular srun steps are ranks.
_SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
_SLURM_SPECIAL_STEP_NAMES = frozenset({"batch", "extern", "interactive", "pending"})
# Written by LaunchEnv.export() so that detect() after export() reports the same launcher.
_LAUNCHER_VAR = "DISTRIB_LAUNCHER"

_INT_RE = re.compile(r"[+-]?\d+")


class LaunchEnvError(RuntimeError):
    """The launch environment is inconsistent; the message names the variable and the fix."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits among the ranks, and where rank 0 listens."""

    launcher: str  # "torchrun" | "slurm" | "mpi" | "none"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise LaunchEnvError(f"launcher={self.launcher!r} is unknown; use one of {', '.join(LAUNCHERS)}")
        if self.world_size < 1:
            raise LaunchEnvError(f"world_size={self.world_size} must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise LaunchEnvError(f"rank={self.rank} is outside 0..{self.world_size - 1} (world_size={self.world_size})")
        if not 1 <= self.local_world_size <= self.world_size:
            raise LaunchEnvError(
                f"local_world_size={self.local_world_size} must be between 1 and world_size={self.world_size}"
            )
        if not 0 <= self.local_rank < self.local_world_size:
            raise LaunchEnvError(
                f"local_rank={self.local_rank} is outside 0..{self.local_world_size - 1} "
                f"(local_world_size={self.local_world_size})"
            )
        if not 0 <= self.node_rank < self.world_size:
            raise LaunchEnvError(f"node_rank={self.node_rank} is outside 0..{self.world_size - 1}")
        if not self.master_addr:
            raise LaunchEnvError("master_addr is empty; set MASTER_ADDR to rank 0's host")
        if not 1 <= self.master_port <= 65535:
            raise LaunchEnvError(f"master_port={self.master_port} is outside 1..65535; set MASTER_PORT to a free port")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def env_vars(self) -> dict[str, str]:
        """The variables :meth:`export` writes."""
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            _LAUNCHER_VAR: self.launcher,
        }

    def export(self) -> None:
        """Write the torch ``env://`` variables into ``os.environ`` (overwriting stale ones).

        Afterwards ``detect()`` returns this same record.
        """
        os.environ.update(self.env_vars())


# --------------------------------------------------------------------------- parsing helpers


def _get(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """First of ``names`` that is set to a non-empty value, as ``(name, value)``."""
    for name in names:
        value = environ.get(name)
        if value is not None and value.strip() != "":
            return name, value.strip()
    return None


def _as_int(name: str, value: str, *, minimum: int = 0) -> int:
    if not _INT_RE.fullmatch(value):
        raise LaunchEnvError(f"{name}={value!r} is not an integer; unset it or set it to a whole number")
    number = int(value)
    if number < minimum:
        raise LaunchEnvError(f"{name}={number} must be >= {minimum}; fix or unset {name}")
    return number


def _int_var(environ: Mapping[str, str], *names: str, minimum: int = 0) -> tuple[str, int] | None:
    found = _get(environ, *names)
    if found is None:
        return None
    return found[0], _as_int(found[0], found[1], minimum=minimum)


def _port(name: str, value: str) -> int:
    port = _as_int(name, value, minimum=1)
    if port > 65535:
        raise LaunchEnvError(f"{name}={port} is not a TCP port; set it between 1 and 65535")
    return port


def _check_rank(rank_name: str, rank: int, size_name: str, size: int) -> None:
    if rank >= size:
        raise LaunchEnvError(
            f"{rank_name}={rank} is not below {size_name}={size}; ranks run from 0 to {size_name}-1, "
            f"fix the launcher arguments or unset stale variables"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- Slurm helpers


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in hostlist {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append(text[start:])
    return parts


def _expand_range(spec: str, hostlist: str, first_only: bool = False) -> list[str]:
    """``"001-003,7"`` -> ``["001", "002", "003", "7"]`` (zero padding follows the low bound)."""
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in hostlist {hostlist!r}")
        if not sep:
            out.append(lo)
            continue
        low, high = int(lo), int(hi)
        if high < low:
            raise ValueError(f"descending range {item!r} in hostlist {hostlist!r}")
        width = len(lo) if len(lo) > 1 and lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(low, (low if first_only else high) + 1))
    return out[:1] if first_only else out


def _host_pieces(pattern: str, hostlist: str, first_only: bool = False) -> list[list[str]]:
    """``"gpu-[1-2]-ib"`` -> ``[["gpu-"], ["1", "2"], ["-ib"]]``."""
    pieces: list[list[str]] = []
    pos = 0
    for match in re.finditer(r"\[([^\[\]]*)\]", pattern):
        if match.start() > pos:
            pieces.append([pattern[pos : match.start()]])
        pieces.append(_expand_range(match.group(1), hostlist, first_only))
        pos = match.end()
    if pos < len(pattern):
        pieces.append([pattern[pos:]])
    if any("[" in p or "]" in p for piece in pieces for p in piece):
        raise ValueError(f"unbalanced brackets in hostlist {hostlist!r}")
    return pieces


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist (``node[001-004,007]``, ``a1,b2``, ``gpu-[1-2]-ib``, ``r[1-2]n[1-2]``).

    Several bracket groups in one name expand as a product, leftmost varying slowest (as
    ``scontrol show hostnames`` does). Raises :class:`ValueError` on malformed input.
    """
    hosts: list[str] = []
    for pattern in _split_top_level(hostlist.strip()):
        pattern = pattern.strip()
        if not pattern:
            continue
        combos = [""]
        for piece in _host_pieces(pattern, hostlist):
            combos = [prefix + part for prefix in combos for part in piece]
        hosts.extend(combos)
    if not hosts:
        raise ValueError(f"empty hostlist {hostlist!r}")
    return hosts


def first_host(hostlist: str) -> str:
    """First host of a Slurm hostlist, without expanding the rest of it."""
    for pattern in _split_top_level(hostlist.strip()):
        pattern = pattern.strip()
        if pattern:
            return "".join(piece[0] for piece in _host_pieces(pattern, hostlist, first_only=True))
    raise ValueError(f"empty hostlist {hostlist!r}")


def parse_tasks_per_node(value: str) -> list[int]:
    """``"2(x3),1"`` -> ``[2, 2, 2, 1]``. Raises :class:`ValueError` on malformed input."""
    counts: list[int] = []
    for item in value.strip().split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"bad tasks-per-node entry {item!r} in {value!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def slurm_port(job_id: int) -> int:
    """The port every task of a Slurm job derives from the job id: 20000..39999."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _slurm_step(environ: Mapping[str, str]) -> bool:
    """True when this process is a task of a regular srun job step (see the module doc)."""
    if _get(environ, "SLURM_PROCID") is None:
        return False
    found = _get(environ, "SLURM_STEP_ID", "SLURM_STEPID")
    if found is None:
        return False  # sbatch batch shell (or a hand-set SLURM_PROCID): not one of N ranks
    name, value = found
    if value.lower() in _SLURM_SPECIAL_STEP_NAMES:
        return False
    return _as_int(name, value) < _SLURM_MAX_NORMAL_STEP_ID


def _slurm_world(environ: Mapping[str, str]) -> tuple[str, int] | None:
    return _int_var(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS", minimum=1)


# --------------------------------------------------------------------------- MPI helpers

_MPI_FAMILIES = (
    # (rank var, size var, local rank vars, local size vars)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",), ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")),
    ("PMIX_RANK", None, ("MPI_LOCALRANKID",), ("MPI_LOCALNRANKS",)),  # PMIx exports no size
)


def _mpi_family(environ: Mapping[str, str]) -> tuple[str, str | None, tuple[str, ...], tuple[str, ...]] | None:
    for family in _MPI_FAMILIES:
        if _get(environ, family[0]) is not None:
            return family
    return None


def _mpi_comm_world() -> tuple[Any, Any] | None:
    """``(MPI.COMM_WORLD, MPI.COMM_TYPE_SHARED)`` via a lazy mpi4py import; None without mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD, MPI.COMM_TYPE_SHARED


def _mpi_exchange(comm: Any, shared: Any, environ: Mapping[str, str]) -> dict[str, Any]:
    """One collective round every rank joins: local rank/size, node rank, rank 0's master."""
    rank = comm.Get_rank()
    node = comm.Split_type(shared, key=rank)
    try:
        local_rank, local_size = node.Get_rank(), node.Get_size()
        leader = node.bcast(rank, root=0)  # lowest world rank on this node names the node
    finally:
        node.Free()
    mine = (leader, socket.gethostname(), environ.get("MASTER_ADDR") or None, environ.get("MASTER_PORT") or None)
    table = comm.allgather(mine)
    leaders = sorted({row[0] for row in table})
    _, host0, addr0, port0 = table[0]
    return {
        "rank": rank,
        "size": comm.Get_size(),
        "local_rank": local_rank,
        "local_size": local_size,
        "node_rank": leaders.index(leader),
        "master_addr": addr0 or host0,
        "master_port": port0,
    }


# --------------------------------------------------------------------------- detection


def _classify(environ: Mapping[str, str]) -> str:
    has_rank = _get(environ, "RANK") is not None
    has_world = _get(environ, "WORLD_SIZE") is not None
    if has_rank and has_world:
        return "torchrun"
    if has_world:
        raise LaunchEnvError(
            "WORLD_SIZE is set but RANK is not; set both (torchrun does) or unset WORLD_SIZE so the "
            "launcher's own variables (srun, mpirun) are used"
        )
    if has_rank:
        raise LaunchEnvError("RANK is set but WORLD_SIZE is not; export WORLD_SIZE (or unset RANK)")
    slurm = _slurm_step(environ)
    family = _mpi_family(environ)
    if slurm and family is not None:
        # srun --mpi=pmi2/pmix sets both and they agree; mpirun inside an allocation starts its
        # daemons with srun, so the ranks inherit a daemon's Slurm variables, which disagree.
        mpi_rank = _int_var(environ, family[0])
        mpi_size = _int_var(environ, family[1], minimum=1) if family[1] else None
        slurm_rank = _int_var(environ, "SLURM_PROCID")
        slurm_size = _slurm_world(environ)
        agree = mpi_rank is not None and slurm_rank is not None and mpi_rank[1] == slurm_rank[1]
        if mpi_size is not None and slurm_size is not None:
            agree = agree and mpi_size[1] == slurm_size[1]
        return "slurm" if agree else "mpi"
    if slurm:
        return "slurm"
    if family is not None:
        return "mpi"
    return "none"


def _detect_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    _, rank = _int_var(environ, "RANK")  # type: ignore[misc]
    _, world = _int_var(environ, "WORLD_SIZE", minimum=1)  # type: ignore[misc]
    _check_rank("RANK", rank, "WORLD_SIZE", world)
    single = world == 1

    local = _int_var(environ, "LOCAL_RANK")
    if local is None and not single:
        raise LaunchEnvError(
            f"RANK/WORLD_SIZE are set (world of {world}) but LOCAL_RANK is not; "
            "launch with torchrun or export LOCAL_RANK (the rank within this node)"
        )
    local_rank = local[1] if local else 0
    lsize = _int_var(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", minimum=1)
    if lsize is None and not single:
        raise LaunchEnvError(
            f"RANK/WORLD_SIZE are set (world of {world}) but LOCAL_WORLD_SIZE is not; "
            "launch with torchrun or export LOCAL_WORLD_SIZE (ranks on this node)"
        )
    lsize_name, local_world = lsize if lsize else ("LOCAL_WORLD_SIZE", 1)
    if local_world > world:
        raise LaunchEnvError(f"{lsize_name}={local_world} exceeds WORLD_SIZE={world}; fix one of them")
    _check_rank("LOCAL_RANK", local_rank, lsize_name, local_world)
    if local_rank > rank:
        raise LaunchEnvError(f"LOCAL_RANK={local_rank} exceeds RANK={rank}; a local rank cannot exceed the global rank")

    node = _int_var(environ, "GROUP_RANK", "NODE_RANK")
    if node is not None:
        node_name, node_rank = node
        if node_rank > rank:
            raise LaunchEnvError(f"{node_name}={node_rank} exceeds RANK={rank}; fix {node_name} or unset it")
    else:
        node_rank = rank // local_world

    addr = _get(environ, "MASTER_ADDR")
    port = _get(environ, "MASTER_PORT")
    if not single and (addr is None or port is None):
        missing = "MASTER_ADDR" if addr is None else "MASTER_PORT"
        raise LaunchEnvError(
            f"RANK/WORLD_SIZE are set (world of {world}) but {missing} is not; "
            f"launch with torchrun or export {missing} (rank 0's host and a free port on it)"
        )
    master_addr = addr[1] if addr else "127.0.0.1"
    master_port = _port(*port) if port else _free_port()

    launcher = "torchrun"
    if _get(environ, "TORCHELASTIC_RUN_ID") is None:
        # Re-detection after LaunchEnv.export(): keep the launcher that was detected first.
        previous = (environ.get(_LAUNCHER_VAR) or "").strip()
        if previous in LAUNCHERS:
            launcher = previous
    return LaunchEnv(launcher, rank, local_rank, world, local_world, node_rank, master_addr, master_port)


def _detect_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    _, rank = _int_var(environ, "SLURM_PROCID")  # type: ignore[misc]
    world_var = _slurm_world(environ)
    if world_var is None:
        raise LaunchEnvError(
            "SLURM_PROCID is set inside an srun step but SLURM_STEP_NUM_TASKS/SLURM_NTASKS are not; "
            "start the ranks with srun --ntasks=N (or export SLURM_NTASKS)"
        )
    world_name, world = world_var
    _check_rank("SLURM_PROCID", rank, world_name, world)

    local = _int_var(environ, "SLURM_LOCALID")
    if local is None:
        raise LaunchEnvError("SLURM_LOCALID is not set inside an srun step; start the ranks with srun")
    local_rank = local[1]

    node_rank, lsize_name, local_world = _slurm_node(environ, rank, world)
    if local_world > world:
        raise LaunchEnvError(
            f"{lsize_name} is {local_world}, more than {world_name}={world}; unset stale Slurm variables"
        )
    if local_rank >= local_world:
        raise LaunchEnvError(
            f"SLURM_LOCALID={local_rank} is not below {lsize_name}, which is {local_world}; "
            "unset stale Slurm variables or start the ranks with srun"
        )
    if node_rank >= world:
        raise LaunchEnvError(f"SLURM_NODEID={node_rank} is not below {world_name}={world}; unset stale Slurm variables")
    master_addr = _slurm_master_addr(environ)
    master_port = _slurm_master_port(environ)
    return LaunchEnv("slurm", rank, local_rank, world, local_world, node_rank, master_addr, master_port)


def _slurm_node(environ: Mapping[str, str], rank: int, world: int) -> tuple[int, str, int]:
    """(node rank, what names the local world size in a message, local world size) of a Slurm task.

    The local world size is this node's entry of ``SLURM_STEP_TASKS_PER_NODE`` (else ``SLURM_TASKS_PER_NODE``),
    else ``SLURM_NTASKS_PER_NODE``.
    """
    node = _int_var(environ, "SLURM_NODEID", "SLURM_STEP_NODEID")
    tpn = _get(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if tpn is None:
        per_node = _int_var(environ, "SLURM_NTASKS_PER_NODE", minimum=1)
        if per_node is None:
            if world != 1:
                raise LaunchEnvError(
                    "SLURM_TASKS_PER_NODE and SLURM_NTASKS_PER_NODE are both unset inside an srun step; "
                    "start the ranks with srun (which sets them) or export SLURM_NTASKS_PER_NODE"
                )
            per_node = ("SLURM_NTASKS_PER_NODE", 1)
        lsize_name, local_world = per_node
        return (node[1] if node else rank // local_world), lsize_name, local_world
    tpn_name, tpn_value = tpn
    try:
        counts = parse_tasks_per_node(tpn_value)
    except ValueError:
        raise LaunchEnvError(
            f"{tpn_name}={tpn_value!r} is not a tasks-per-node list like '2(x3),1'; unset it or fix it"
        ) from None
    if node is None and len(counts) > 1:
        raise LaunchEnvError(
            f"SLURM_NODEID is not set but {tpn_name}={tpn_value!r} spans several nodes; start the ranks with srun"
        )
    node_name, node_rank = node if node else ("SLURM_NODEID", 0)
    if node_rank >= len(counts):
        raise LaunchEnvError(
            f"{node_name}={node_rank} but {tpn_name}={tpn_value!r} lists only {len(counts)} node(s); "
            "unset stale Slurm variables or start the ranks with srun"
        )
    return node_rank, f"this node's task count (entry {node_rank} of {tpn_name}={tpn_value!r})", counts[node_rank]


def _slurm_master_addr(environ: Mapping[str, str]) -> str:
    """``MASTER_ADDR``, else the first host of the step's node list (where task 0 runs)."""
    addr = _get(environ, "MASTER_ADDR")
    if addr is not None:
        return addr[1]
    nodelist = _get(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if nodelist is None:
        raise LaunchEnvError(
            "neither MASTER_ADDR nor SLURM_STEP_NODELIST/SLURM_JOB_NODELIST/SLURM_NODELIST is set; "
            "export MASTER_ADDR=<host of task 0>"
        )
    try:
        return first_host(nodelist[1])
    except ValueError as exc:
        raise LaunchEnvError(
            f"{nodelist[0]}={nodelist[1]!r} is not a Slurm hostlist ({exc}); export MASTER_ADDR instead"
        ) from None


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    """``MASTER_PORT``, else a port every task derives from the job id without talking to the others."""
    port = _get(environ, "MASTER_PORT")
    if port is not None:
        return _port(*port)
    job = _int_var(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    if job is None:
        raise LaunchEnvError(
            "neither MASTER_PORT nor SLURM_JOB_ID is set; export MASTER_PORT (the same free port on every task)"
        )
    return slurm_port(job[1])


def _detect_mpi(environ: Mapping[str, str]) -> LaunchEnv:
    family = _mpi_family(environ)
    assert family is not None
    rank_var, size_var, local_rank_vars, local_size_vars = family
    rank_name, rank = _int_var(environ, rank_var)  # type: ignore[misc]
    size = _int_var(environ, size_var, minimum=1) if size_var else None
    local = _int_var(environ, *local_rank_vars)
    lsize = _int_var(environ, *local_size_vars, minimum=1)
    if size is not None:
        _check_rank(rank_name, rank, size[0], size[1])

    single = size is not None and size[1] == 1
    found = None if single else _mpi_comm_world()
    comm, shared = found if found is not None else (None, None)
    if comm is not None and size is not None and comm.Get_size() != size[1]:
        # mpi4py was built against another MPI than the mpirun that started us: every process
        # is an MPI singleton. Talking would be wrong; fall back to the environment alone.
        if local is None or lsize is None or _get(environ, "MASTER_ADDR") is None:
            raise LaunchEnvError(
                f"{size[0]}={size[1]} but mpi4py's MPI.COMM_WORLD has {comm.Get_size()} rank(s): mpi4py uses a "
                "different MPI than the launcher; run the mpirun of the MPI mpi4py was built with, or export "
                "MASTER_ADDR and MASTER_PORT"
            )
        comm = None

    if comm is not None:
        info = _mpi_exchange(comm, shared, environ)
        if info["rank"] != rank:
            raise LaunchEnvError(
                f"{rank_name}={rank} but MPI.COMM_WORLD rank is {info['rank']}; unset stale {rank_name}"
            )
        world = info["size"]
        local_rank = local[1] if local else info["local_rank"]
        local_world = lsize[1] if lsize else info["local_size"]
        node_rank = info["node_rank"]
        master_addr = info["master_addr"]
        port_value = info["master_port"]
        master_port = _port("MASTER_PORT", port_value) if port_value else DEFAULT_MPI_PORT
    else:
        if size is None:
            raise LaunchEnvError(
                f"{rank_name} is set but the world size is not in the environment and mpi4py is not installed; "
                "pip install mpi4py (or export WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT)"
            )
        world = size[1]
        if single:
            local_rank, local_world, node_rank = 0, 1, 0
            master_addr = "127.0.0.1"
            port = _get(environ, "MASTER_PORT")
            master_port = _port(*port) if port else _free_port()
        else:
            if local is None or lsize is None:
                missing = " or ".join(local_rank_vars if local is None else local_size_vars)
                raise LaunchEnvError(
                    f"the MPI launcher did not set {missing} and mpi4py is not installed; "
                    "pip install mpi4py so the local rank can be discovered"
                )
            local_rank, local_world = local[1], lsize[1]
            node_rank = rank // local_world  # exact for mpirun's default block placement
            addr = _get(environ, "MASTER_ADDR")
            if addr is None:
                raise LaunchEnvError(
                    "MPI launch without MASTER_ADDR and without mpi4py; pip install mpi4py "
                    "(rank 0's host is then broadcast) or export MASTER_ADDR=<host of rank 0>"
                )
            master_addr = addr[1]
            port = _get(environ, "MASTER_PORT")
            master_port = _port(*port) if port else DEFAULT_MPI_PORT

    lname = (local[0] if local else "MPI local rank")
    sname = (lsize[0] if lsize else "MPI local size")
    if local_world > world:
        raise LaunchEnvError(f"{sname}={local_world} exceeds the MPI world size {world}; unset stale MPI variables")
    _check_rank(lname, local_rank, sname, local_world)
    return LaunchEnv("mpi", rank, local_rank, world, local_world, node_rank, master_addr, master_port)


def _detect_none(environ: Mapping[str, str]) -> LaunchEnv:
    port = _get(environ, "MASTER_PORT")
    master_port = _port(*port) if port else _free_port()
    return LaunchEnv("none", 0, 0, 1, 1, 0, "127.0.0.1", master_port)


_DETECTORS = {
    "torchrun": _detect_torchrun,
    "slurm": _detect_slurm,
    "mpi": _detect_mpi,
    "none": _detect_none,
}


def detect(environ: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Read how this process was launched. Creates no process group.

    Under MPI with more than one rank this is a collective over ``MPI.COMM_WORLD``: every
    rank must call it. Raises :class:`LaunchEnvError` on an inconsistent environment.
    """
    return _DETECTORS[_classify(environ)](environ)


#: Where launchers put this process's global rank, in the order they are trusted.
RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def launcher_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank as its launcher set it (0 when started by hand), without validating the rest.

    For what every rank says once (rank 0 speaks): cheap enough to call before :func:`detect` has run or when
    it would refuse the environment.
    """
    for name in RANK_VARS:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0


def world_size_hint(environ: Mapping[str, str] = os.environ) -> int | None:
    """The number of ranks the launcher announced, from the environment alone.

    Cheap (no MPI import, no sockets), for validating a config before anything starts.
    None when not launched (including an sbatch batch shell before srun) or when the MPI
    launcher does not put the size in the environment (PMIx).
    """
    launcher = _classify(environ)
    if launcher == "torchrun":
        return _as_int("WORLD_SIZE", environ["WORLD_SIZE"].strip(), minimum=1)
    if launcher == "slurm":
        found = _slurm_world(environ)
        return found[1] if found else None
    if launcher == "mpi":
        family = _mpi_family(environ)
        assert family is not None
        found = _int_var(environ, family[1], minimum=1) if family[1] else None
        return found[1] if found else None
    return None


# --------------------------------------------------------------------------- NCCL

#: ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` for NCCL runs: 2 (CleanUpOnly). When a collective times out, NCCL's
#: watchdog aborts the communicators and leaves the process alive, so the waiting rank's next collective
#: raises ("NCCL communicator was aborted ...") and the loop names the rank that did not arrive. torch's
#: default, 3, and torchrun's, 1, end the process with SIGABRT before Python sees anything.
NCCL_ASYNC_ERROR_HANDLING = "2"
#: Where, under a run's output directory, torch's flight recorder writes one dump per rank (``rank_<R>``).
FLIGHT_RECORDER_DIR = "flight_recorder"


def nccl_env(run_dir: str | os.PathLike | None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables a NCCL process group is made with, so that a hung rank ends the job naming it.

    Set before the process group exists (torch reads them when it makes one): the error handling above;
    a dump of the flight recorder (the last collectives of every rank, ``torchfrtrace`` reads them) on a
    timeout; its ring-buffer size; and, with ``run_dir``, its files under ``<run_dir>/flight_recorder/``.
    torch 2.13 reads the recorder's size as ``TORCH_FR_BUFFER_SIZE`` and its files' prefix as
    ``TORCH_FR_DUMP_TEMP_FILE``, and still accepts their older names (``TORCH_NCCL_TRACE_BUFFER_SIZE``,
    ``TORCH_NCCL_DEBUG_INFO_TEMP_FILE``) with a deprecation warning: the new names are set.

    Args:
        run_dir: the run's output directory, or None to leave the dumps where torch puts them.
        environ: the environment as it is; a variable set there (under either name) is the user's choice
            and is left out.

    Returns:
        The variables to add to the environment (only those not set).
    """
    wanted = [
        (("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"), NCCL_ASYNC_ERROR_HANDLING),
        (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1"),
        # the recorder's ring of recent collectives: torch 2.13's default size, stated, as a dump needs one
        (("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), "2000"),
    ]
    if run_dir is not None:
        prefix = os.path.join(os.path.abspath(run_dir), FLIGHT_RECORDER_DIR, "rank_")
        wanted.append((("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"), prefix))
    return {names[0]: value for names, value in wanted if not any(n in environ for n in names)}
