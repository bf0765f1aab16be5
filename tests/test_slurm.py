"""examples/slurm/train.sbatch on a real one-node SLURM cluster on localhost.

The fixture installs (apt-get, when missing) and starts munge, slurmctld and
slurmd with a generated minimal slurm.conf in a temporary directory (NodeName
localhost CPUs=2, proctrack/linuxproc, task/none, no cgroups, free ports), then
tears everything down. Each test submits the sbatch script with 2 tasks and the
toy task for a few steps and checks the job log. Skips, saying why, where the
packages cannot be installed or the daemons cannot run here (e.g. not root).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.distributed import free_port
from tests.helpers.toy import toy_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "examples", "slurm", "train.sbatch")
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged"]


def _install_or_skip() -> None:
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("SLURM/munge are not installed and cannot be installed here "
                    f"(need root and apt-get): {', '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        pytest.skip(f"could not install {', '.join(PACKAGES)} with apt-get: {proc.stderr.strip()[-500:]}")


SLURM_CONF = """\
ClusterName=moetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=60
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """munged + slurmctld + slurmd in the foreground, owned by this test process."""

    def __init__(self, workdir: str):
        self.d = workdir
        self.procs: list[subprocess.Popen] = []
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(self.d, sub), exist_ok=True)
        os.chmod(os.path.join(self.d, "munge"), 0o700)
        self.munge_socket = os.path.join(self.d, "munge", "munge.socket")
        self.conf = os.path.join(self.d, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(SLURM_CONF.format(d=self.d, ctld_port=free_port(), slurmd_port=free_port(),
                                      munge_socket=self.munge_socket))
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def _start(self, cmd, log_name):
        log = open(os.path.join(self.d, log_name), "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self) -> None:
        key = os.path.join(self.d, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        m = os.path.join(self.d, "munge")
        self._start(["munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                     f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"],
                    "munged.out")
        self._wait(lambda: os.path.exists(self.munge_socket), 20, "munged did not create its socket")
        self._start(["slurmctld", "-D", "-c", "-i", "-f", self.conf], "slurmctld.out")
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), 30, "slurmctld did not come up")
        self._start(["slurmd", "-D", "-N", "localhost", "-f", self.conf], "slurmd.out")
        self._wait(lambda: self._node_state() in ("idle", "mixed", "allocated"), 40, "slurmd did not register")

    def _ok(self, cmd, needle) -> bool:
        try:
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=10).stdout
        except subprocess.TimeoutExpired:
            return False
        return needle in out

    def _node_state(self) -> str:
        out = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=self.env, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if out.startswith("down") or out.startswith("drain"):
            subprocess.run(["scontrol", "update", "nodename=localhost", "state=resume"], env=self.env,
                           capture_output=True, timeout=10)
        return out.rstrip("*")

    def _wait(self, cond, timeout, what) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{what}: {p.args[0]} exited with {p.returncode}\n{self.logs()}")
            if cond():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout}s\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("munged.out", "slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log"):
            path = os.path.join(self.d, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name} ---\n" + f.read()[-2000:])
        return "\n".join(out)

    def sbatch(self, args, env_extra=None) -> str:
        env = {**self.env, **(env_extra or {})}
        proc = subprocess.run(["sbatch", "--parsable", *args], env=env, capture_output=True, text=True,
                              timeout=30, cwd=ROOT)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}\n{self.logs()}"
        return proc.stdout.strip().split(";")[0]

    def wait_job(self, job_id: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < end:
            out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True,
                                 text=True, timeout=10).stdout
            fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
            state = fields.get("JobState", "?")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1.0)
        subprocess.run(["scancel", job_id], env=self.env, capture_output=True, timeout=10)
        return f"TIMEOUT_IN_TEST (last state {state})"

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=10)
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    _install_or_skip()
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd/slurmctld as root (SlurmUser=root); not root here")
    c = Cluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
    except RuntimeError as e:
        c.stop()
        pytest.fail(f"could not start the local SLURM cluster: {e}")
    yield c
    c.stop()


def _submit_toy(cluster, tmp_path, launcher):
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(toy_config(tmp_path / "out", parallel={"ep": 2},
                                   telemetry={"progress_bar": True, "plots": True}).to_yaml())
    log = tmp_path / "job.out"
    job = cluster.sbatch([f"--output={log}", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--time=5",
                          SBATCH, str(cfg_path), "--set", "train.steps=4", "--set", "train.log_every=1"],
                         env_extra={"PYTHON": sys.executable, "MOE_LAUNCHER": launcher})
    state = cluster.wait_job(job, timeout=150)
    text = log.read_text() if log.exists() else "<no job log>"
    assert state == "COMPLETED", f"job {job} ended {state}\n--- job log ---\n{text}\n{cluster.logs()}"
    return text, tmp_path / "out"


def test_sbatch_torchrun_two_tasks(cluster, tmp_path):
    text, out = _submit_toy(cluster, tmp_path, "torchrun")
    assert "2 process(es) per node, rendezvous localhost:" in text and "launcher torchrun" in text
    assert "world 2 (dp=2, ep=2, edp=1)" in text
    for step in range(1, 5):
        assert f"step {step}/4 | loss " in text, text
    assert text.strip().splitlines()[-1].startswith("zero-shot accuracy: 0.")
    assert (out / "checkpoints" / "step_00000004" / ".metadata").is_file()


def test_sbatch_srun_launcher_two_tasks(cluster, tmp_path):
    text, out = _submit_toy(cluster, tmp_path, "srun")
    assert "launcher srun" in text and "world 2 (dp=2, ep=2, edp=1)" in text
    assert "step 4/4 | loss " in text, text
    assert (out / "checkpoints" / "step_00000004" / ".metadata").is_file()


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_sbatch_sigterm_stops_every_rank_after_one_step_with_a_checkpoint(cluster, tmp_path, launcher):
    """What ``#SBATCH --signal=TERM@120`` does before the time limit, sent now with ``scancel --signal``."""
    text = open(SBATCH).read()
    assert "\n#SBATCH --signal=TERM@120\n" in text
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(toy_config(tmp_path / "out", parallel={"ep": 2}).to_yaml())
    log = tmp_path / "job.out"
    job = cluster.sbatch([f"--output={log}", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--time=5",
                          SBATCH, str(cfg_path), "--set", "train.steps=1000000", "--set", "train.log_every=10",
                          "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"],
                         env_extra={"PYTHON": sys.executable, "MOE_LAUNCHER": launcher})
    end = time.monotonic() + 120
    while time.monotonic() < end and not (log.exists() and "step 20/1000000 |" in log.read_text()):
        time.sleep(0.5)
    assert log.exists() and "step 20/1000000 |" in log.read_text(), f"job {job} did not train\n{cluster.logs()}"
    subprocess.run(["scancel", "--signal=TERM", job], env=cluster.env, check=True, timeout=10)
    state = cluster.wait_job(job, timeout=120)
    text = log.read_text()
    stopped = [line for line in text.splitlines() if line.startswith("stopped by SIGTERM after step ")]
    assert len(stopped) == 1, f"job {job} ended {state}\n--- job log ---\n{text[-4000:]}"
    step = int(stopped[0].split("after step ")[1].split()[0])
    # SLURM signals the tasks one after the other: the ranks may agree before the second one got it
    assert any(f"stopping after step {step} of 1000000: SIGTERM received by {who}; saving a checkpoint" in text
               for who in ("rank 0", "rank 1", "ranks 0-1")), text[-4000:]
    assert stopped[0].endswith(f"step_{step:08d}; exit code 75; continue with train.resume: auto in the same "
                               "train.out_dir")
    assert (tmp_path / "out" / "checkpoints" / f"step_{step:08d}" / ".metadata").is_file()
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert state == "FAILED", state  # exit status 75, not 0: the job did not finish its steps
