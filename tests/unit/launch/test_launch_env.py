"""launch.env: launcher detection, normalised into LaunchEnv, without any process group."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import distrib.launch.env as launch_env
from distrib.launch.env import (
    LaunchEnv,
    LaunchEnvError,
    detect,
    expand_hostlist,
    first_host,
    parse_tasks_per_node,
    slurm_port,
    world_size_hint,
)

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _no_real_mpi(monkeypatch):
    """Unit tests never initialise MPI; tests that need a communicator install a fake one."""

    def forbidden():
        raise AssertionError("detect() tried to use mpi4py in a test that did not expect it")

    monkeypatch.setattr(launch_env, "_mpi_comm_world", forbidden)


# --------------------------------------------------------------------------- environments


def srun_task(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """What a task of `srun -N 4 --ntasks-per-node 2` inside job 123456 sees."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_JOBID": "123456",
        "SLURM_STEP_ID": "0",
        "SLURM_STEPID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_TASKS_PER_NODE": "2(x4)",
        "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
        "SLURM_JOB_NODELIST": "node[001-004]",
        "SLURM_STEP_NODELIST": "node[001-004]",
        "SLURM_NODELIST": "node[001-004]",
    }
    env.update(extra)
    return env


def sbatch_shell(**extra: str) -> dict[str, str]:
    """The batch script's own shell for `sbatch -N 4 --ntasks-per-node 2` (no srun yet)."""
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_JOBID": "123456",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "8",
        "SLURM_NPROCS": "8",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_TASKS_PER_NODE": "2(x4)",
        "SLURM_JOB_NODELIST": "node[001-004]",
        "SLURM_NODELIST": "node[001-004]",
        "ENVIRONMENT": "BATCH",
    }
    env.update(extra)
    return env


def torchrun_worker(rank: int, local_rank: int, group_rank: int, **extra: str) -> dict[str, str]:
    """What `torchrun --nnodes 2 --nproc-per-node 4` gives a worker."""
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "GROUP_RANK": str(group_rank),
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "node001",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "none",
    }
    env.update(extra)
    return env


class FakeComm:
    """Just enough of an mpi4py communicator for one rank's view of a fixed world.

    ``hosts[r]`` is world rank r's hostname; ``env_of[r]`` the (MASTER_ADDR, MASTER_PORT) rank r
    sees. Nodes are told apart by hostname, like MPI's shared-memory split.
    """

    def __init__(self, rank, hosts, env_of=None, local=None):
        self.rank, self.hosts = rank, hosts
        self.env_of = env_of or {}
        self.local = local  # (rank, size) of the node communicator; None -> derive from hosts

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.hosts)

    def Split_type(self, split_type, key):
        peers = [r for r, h in enumerate(self.hosts) if h == self.hosts[self.rank]]
        return _FakeNode(peers, self.rank, self.local)

    def allgather(self, mine):
        rows = []
        for r, host in enumerate(self.hosts):
            if r == self.rank:
                rows.append(mine)
                continue
            leader = min(p for p, h in enumerate(self.hosts) if h == host)
            addr, port = self.env_of.get(r, (None, None))
            rows.append((leader, host, addr, port))
        return rows


class _FakeNode:
    def __init__(self, peers, rank, local):
        self.peers, self.rank, self.local = peers, rank, local

    def Get_rank(self):
        return self.local[0] if self.local else self.peers.index(self.rank)

    def Get_size(self):
        return self.local[1] if self.local else len(self.peers)

    def bcast(self, value, root=0):
        return self.peers[root]

    def Free(self):
        pass


def use_comm(monkeypatch, comm):
    monkeypatch.setattr(launch_env, "_mpi_comm_world", lambda: (comm, "shared"))
    monkeypatch.setattr(socket, "gethostname", lambda: comm.hosts[comm.rank])


def without_mpi4py(monkeypatch):
    monkeypatch.setattr(launch_env, "_mpi_comm_world", lambda: None)


# --------------------------------------------------------------------------- hostlists


@pytest.mark.parametrize(
    ("hostlist", "hosts"),
    [
        ("node17", ["node17"]),
        ("a1,b2", ["a1", "b2"]),
        ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
        ("gpu-[1-2]-ib", ["gpu-1-ib", "gpu-2-ib"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("login,gpu[3,5],cpu-01", ["login", "gpu3", "gpu5", "cpu-01"]),
        ("[5-6]x", ["5x", "6x"]),
    ],
)
def test_hostlist_expands_like_scontrol_and_first_host_is_its_head(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts
    assert first_host(hostlist) == hosts[0]


def test_first_host_does_not_expand_a_huge_range():
    assert first_host("node[0000000-9999999],other") == "node0000000"


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[3-1]", "node[a-b]", "node[1-2", "", "n[[1]]"])
def test_malformed_hostlist_is_rejected(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)
    with pytest.raises(ValueError):
        first_host(bad)


def test_tasks_per_node_expands_repeat_counts():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        parse_tasks_per_node("2(3)")


# --------------------------------------------------------------------------- Slurm


def test_srun_task_is_a_slurm_rank_with_master_on_the_first_step_node():
    env = detect(srun_task(procid=3, localid=1, nodeid=1))
    assert env == LaunchEnv(
        launcher="slurm",
        rank=3,
        local_rank=1,
        world_size=8,
        local_world_size=2,
        node_rank=1,
        master_addr="node001",
        master_port=20000 + 123456 % 20000,
    )


def test_every_slurm_task_derives_the_same_port_from_the_job_id():
    ports = {detect(srun_task(p, p % 2, p // 2)).master_port for p in range(8)}
    assert ports == {slurm_port(123456)}
    assert all(20000 <= slurm_port(j) < 40000 for j in (0, 1, 19999, 20000, 987654321))


def test_slurm_uneven_tasks_per_node_give_this_nodes_count():
    env = detect(
        srun_task(
            procid=6, localid=0, nodeid=3,
            SLURM_NTASKS="7", SLURM_STEP_NUM_TASKS="7",
            SLURM_TASKS_PER_NODE="2(x3),1", SLURM_STEP_TASKS_PER_NODE="2(x3),1",
        )
    )
    assert (env.rank, env.world_size, env.local_world_size, env.node_rank) == (6, 7, 1, 3)


def test_slurm_step_variables_win_over_preserved_allocation_variables():
    # `srun -n 2 -N 1 --preserve-env` in an 8-task allocation keeps SLURM_NTASKS=8.
    env = detect(
        srun_task(
            procid=1, localid=1, nodeid=0,
            SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
            SLURM_STEP_NODELIST="node003",
        )
    )
    assert (env.world_size, env.local_world_size, env.master_addr) == (2, 2, "node003")


def test_slurm_honours_master_addr_and_port_overrides():
    env = detect(srun_task(0, 0, 0, MASTER_ADDR="10.0.0.5", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("10.0.0.5", 31000)


def test_slurm_master_falls_back_to_job_nodelist_without_step_nodelist():
    base = srun_task(0, 0, 0, SLURM_JOB_NODELIST="gpu-[1-2]-ib", SLURM_NODELIST="gpu-[1-2]-ib")
    del base["SLURM_STEP_NODELIST"]
    assert detect(base).master_addr == "gpu-1-ib"


def test_legacy_slurm_stepid_alone_marks_a_step():
    env = srun_task(2, 0, 1)
    del env["SLURM_STEP_ID"]
    assert detect(env).launcher == "slurm"


def test_sbatch_batch_shell_is_not_mistaken_for_rank_zero():
    env = sbatch_shell()
    assert detect(env).launcher == "none"
    assert detect(env).world_size == 1
    assert world_size_hint(env) is None


@pytest.mark.parametrize("step_id", ["4294967291", "4294967294", "4294967290", "4294967292", "batch", "extern"])
def test_special_slurm_steps_are_not_ranks(step_id):
    # batch (0xfffffffb, formerly 0xfffffffe), interactive (0xfffffffa), extern (0xfffffffc)
    assert detect(sbatch_shell(SLURM_STEP_ID=step_id)).launcher == "none"


def test_salloc_shell_without_procid_is_not_a_rank():
    env = sbatch_shell()
    for key in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"):
        del env[key]
    assert detect(env).launcher == "none"


def test_torchrun_inside_srun_uses_torchruns_variables():
    env = srun_task(procid=1, localid=0, nodeid=1)  # one srun task per node, each running torchrun
    env.update(torchrun_worker(rank=6, local_rank=2, group_rank=1))
    got = detect(env)
    assert (got.launcher, got.rank, got.local_rank, got.world_size) == ("torchrun", 6, 2, 8)
    assert (got.local_world_size, got.node_rank, got.master_addr, got.master_port) == (4, 1, "node001", 29400)
    assert world_size_hint(env) == 8


# --------------------------------------------------------------------------- torchrun


def test_torchrun_worker_record():
    assert detect(torchrun_worker(rank=5, local_rank=1, group_rank=1)) == LaunchEnv(
        "torchrun", 5, 1, 8, 4, 1, "node001", 29400
    )


def test_single_process_with_rank_and_world_size_needs_no_master():
    env = detect({"RANK": "0", "WORLD_SIZE": "1"})
    assert (env.rank, env.world_size, env.local_world_size, env.master_addr) == (0, 1, 1, "127.0.0.1")
    assert 1 <= env.master_port <= 65535


# --------------------------------------------------------------------------- MPI


def test_open_mpi_ranks_take_master_and_node_from_rank_zero(monkeypatch):
    hosts = ["alpha", "alpha", "beta", "beta"]
    use_comm(monkeypatch, FakeComm(rank=3, hosts=hosts))
    env = detect({
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    })
    assert env == LaunchEnv("mpi", 3, 1, 4, 2, 1, "alpha", 29500)


def test_mpich_local_rank_comes_from_mpi_when_the_launcher_omits_it(monkeypatch):
    use_comm(monkeypatch, FakeComm(rank=2, hosts=["a", "b", "b"]))
    env = detect({"PMI_RANK": "2", "PMI_SIZE": "3"})
    assert (env.local_rank, env.local_world_size, env.node_rank, env.master_addr) == (1, 2, 1, "a")


def test_mpi_uses_rank_zeros_master_variables_even_if_not_forwarded_here(monkeypatch):
    # Open MPI forwards MASTER_* only with -x: rank 0 has them, rank 1 does not.
    use_comm(monkeypatch, FakeComm(rank=1, hosts=["a", "b"], env_of={0: ("10.1.1.1", "31337")}))
    env = detect({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 31337)


def test_pmix_rank_gets_its_world_size_from_mpi(monkeypatch):
    use_comm(monkeypatch, FakeComm(rank=0, hosts=["a", "a"]))
    env = detect({"PMIX_RANK": "0"})
    assert (env.launcher, env.world_size, env.local_world_size) == ("mpi", 2, 2)
    assert world_size_hint({"PMIX_RANK": "0"}) is None


def test_mpi_without_mpi4py_works_from_the_environment(monkeypatch):
    without_mpi4py(monkeypatch)
    env = detect({
        "PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
        "MASTER_ADDR": "head",
    })
    assert env == LaunchEnv("mpi", 3, 1, 4, 2, 1, "head", 29500)


def test_mpi_without_mpi4py_or_master_addr_says_how_to_fix(monkeypatch):
    without_mpi4py(monkeypatch)
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR.*mpi4py|mpi4py.*MASTER_ADDR"):
        detect({"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"})


def test_mpi4py_linked_to_another_mpi_is_reported(monkeypatch):
    use_comm(monkeypatch, FakeComm(rank=0, hosts=["a"]))  # every process is an MPI singleton
    with pytest.raises(LaunchEnvError, match="OMPI_COMM_WORLD_SIZE=2.*different MPI"):
        detect({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})


def test_single_mpi_rank_does_not_touch_mpi():
    env = detect({"PMI_RANK": "0", "PMI_SIZE": "1"})  # the autouse fixture forbids mpi4py
    assert (env.launcher, env.world_size, env.master_addr) == ("mpi", 1, "127.0.0.1")


def test_mpirun_inside_an_allocation_is_mpi_not_the_srun_daemon(monkeypatch):
    # Hydra/Open MPI start one daemon per node with srun; the ranks inherit its Slurm variables.
    env = srun_task(procid=1, localid=0, nodeid=1, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)")
    env.update({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"})
    use_comm(monkeypatch, FakeComm(rank=5, hosts=["node001"] * 4 + ["node002"] * 4))
    got = detect(env)
    assert (got.launcher, got.rank, got.world_size, got.local_rank, got.node_rank) == ("mpi", 5, 8, 1, 1)
    assert world_size_hint(env) == 8


def test_srun_with_pmi_plugin_is_slurm_when_both_agree():
    env = srun_task(procid=3, localid=1, nodeid=1, PMI_RANK="3", PMI_SIZE="8")
    assert detect(env).launcher == "slurm"  # the autouse fixture proves MPI was not touched


# --------------------------------------------------------------------------- none


def test_plain_process_is_rank_zero_of_one_on_a_free_local_port():
    env = detect({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.node_rank) == ("none", 0, 1, 0, 0)
    assert env.master_addr == "127.0.0.1"
    assert 1 <= env.master_port <= 65535


def test_plain_process_keeps_master_port():
    assert detect({"MASTER_PORT": "12345"}).master_port == 12345


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK='x' is not an integer"),
        ({"RANK": "1.5", "WORLD_SIZE": "2"}, r"RANK='1.5' is not an integer"),
        (
            {"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"},
            r"RANK=4 is not below WORLD_SIZE=4",
        ),
        ({"RANK": "-1", "WORLD_SIZE": "4"}, r"RANK=-1 must be >= 0"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be >= 1"),
        ({"WORLD_SIZE": "4"}, r"WORLD_SIZE is set but RANK is not"),
        ({"RANK": "0"}, r"RANK is set but WORLD_SIZE is not"),
        (torchrun_worker(1, 2, 0, LOCAL_WORLD_SIZE="2"), r"LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
        (torchrun_worker(1, 1, 0, LOCAL_WORLD_SIZE="16"), r"LOCAL_WORLD_SIZE=16 exceeds WORLD_SIZE=8"),
        ({k: v for k, v in torchrun_worker(1, 1, 0).items() if k != "MASTER_ADDR"}, r"MASTER_ADDR is not"),
        ({k: v for k, v in torchrun_worker(1, 1, 0).items() if k != "LOCAL_RANK"}, r"LOCAL_RANK is not"),
        (torchrun_worker(1, 1, 0, MASTER_PORT="70000"), r"MASTER_PORT=70000 is not a TCP port"),
        (torchrun_worker(1, 1, 0, MASTER_PORT="http"), r"MASTER_PORT='http' is not an integer"),
        (srun_task(8, 0, 3), r"SLURM_PROCID=8 is not below SLURM_STEP_NUM_TASKS=8"),
        (srun_task(3, 2, 1), r"SLURM_LOCALID=2 is not below this node's task count"),
        (srun_task(3, 1, 4), r"SLURM_NODEID=4 but SLURM_STEP_TASKS_PER_NODE='2\(x4\)' lists only 4"),
        (
            srun_task(3, 1, 1, SLURM_STEP_TASKS_PER_NODE="two"),
            r"SLURM_STEP_TASKS_PER_NODE='two' is not a tasks-per-node list",
        ),
        (srun_task(0, 0, 0, SLURM_STEP_NODELIST="node[1-"), r"SLURM_STEP_NODELIST='node\[1-' is not a Slurm hostlist"),
        (srun_task(0, 0, 0, SLURM_STEP_ID="zero"), r"SLURM_STEP_ID='zero' is not an integer"),
        (
            {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"},
            r"OMPI_COMM_WORLD_RANK=2 is not below OMPI_COMM_WORLD_SIZE=2",
        ),
        ({"PMI_RANK": "0", "PMI_SIZE": "-3"}, r"PMI_SIZE=-3 must be >= 1"),
        ({"MASTER_PORT": "0"}, r"MASTER_PORT=0 must be >= 1"),
    ],
)
def test_inconsistent_environment_raises_one_line_naming_the_variable(environ, message):
    with pytest.raises(LaunchEnvError, match=message) as caught:
        detect(environ)
    assert "\n" not in str(caught.value)


def test_record_itself_rejects_impossible_values():
    with pytest.raises(LaunchEnvError, match="rank=2 is outside"):
        LaunchEnv("none", 2, 0, 2, 1, 0, "127.0.0.1", 1234)
    with pytest.raises(LaunchEnvError, match="launcher='pbs' is unknown"):
        LaunchEnv("pbs", 0, 0, 1, 1, 0, "127.0.0.1", 1234)


# --------------------------------------------------------------------------- hint and export


@pytest.mark.parametrize(
    ("environ", "hint"),
    [
        ({}, None),
        (sbatch_shell(), None),
        (torchrun_worker(0, 0, 0), 8),
        (srun_task(0, 0, 0, SLURM_STEP_NUM_TASKS="6", SLURM_STEP_TASKS_PER_NODE="2(x3)"), 6),
        ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "16"}, 16),
        ({"PMI_RANK": "0", "PMI_SIZE": "3"}, 3),
    ],
)
def test_world_size_hint_reads_the_announced_size_without_mpi(environ, hint):
    assert world_size_hint(environ) == hint


def test_world_size_hint_rejects_garbage():
    with pytest.raises(LaunchEnvError, match="WORLD_SIZE='many' is not an integer"):
        world_size_hint({"RANK": "0", "WORLD_SIZE": "many"})


@pytest.mark.parametrize(
    "environ",
    [srun_task(5, 1, 2), {}, {"MASTER_PORT": "23456"}, torchrun_worker(3, 3, 0)],
    ids=["slurm", "none", "none-port", "torchrun"],
)
def test_export_writes_env_vars_that_detect_reads_back_unchanged(monkeypatch, environ):
    original = detect(environ)
    # A private copy of the environment: export() writes into it, and the real one is never touched
    # (monkeypatch.delenv of an unset variable would not remove what export() adds).
    drop = set(original.env_vars()) | {"TORCHELASTIC_RUN_ID"}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in drop})
    original.export()
    assert os.environ["RANK"] == str(original.rank)
    assert os.environ["LOCAL_RANK"] == str(original.local_rank)
    assert os.environ["WORLD_SIZE"] == str(original.world_size)
    assert os.environ["LOCAL_WORLD_SIZE"] == str(original.local_world_size)
    assert os.environ["GROUP_RANK"] == os.environ["NODE_RANK"] == str(original.node_rank)
    assert os.environ["MASTER_ADDR"] == original.master_addr
    assert os.environ["MASTER_PORT"] == str(original.master_port)
    assert detect(os.environ) == original


def test_package_reexports_the_api():
    import distrib.launch as launch

    assert launch.detect is detect and launch.LaunchEnv is LaunchEnv
    assert launch.LaunchEnvError is LaunchEnvError and launch.world_size_hint is world_size_hint


# --------------------------------------------------------------------------- real mpirun


def _find_mpirun() -> str | None:
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpirun")


_LAUNCH_VARS = re.compile(
    r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|NODE_RANK|MASTER_ADDR|MASTER_PORT|"
    r"TORCHELASTIC_.*|DISTRIB_LAUNCHER|SLURM_.*|OMPI_.*|PMI_.*|PMIX_.*|MPI_LOCAL.*)$"
)


def test_real_mpirun_two_ranks_detect_themselves():
    mpirun = _find_mpirun()
    if mpirun is None:
        pytest.skip("mpirun is neither next to sys.executable nor on PATH")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed")
    environ = {k: v for k, v in os.environ.items() if not _LAUNCH_VARS.match(k)}
    # Unbuffered ranks write each print() piece separately and mpirun interleaves them.
    environ.pop("PYTHONUNBUFFERED", None)
    environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}"
    code = "from launch.env import detect; e=detect(); print(e.rank, e.world_size, e.local_rank, e.master_addr)"
    proc = subprocess.run(
        [mpirun, "-np", "2", sys.executable, "-c", code],
        cwd=REPO, env=environ, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted(line.split() for line in proc.stdout.splitlines() if re.fullmatch(r"\d+ \d+ \d+ \S+", line))
    host = socket.gethostname()
    assert lines == [["0", "2", "0", host], ["1", "2", "1", host]], proc.stdout
