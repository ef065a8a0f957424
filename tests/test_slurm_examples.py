"""The Slurm examples run as they are: each script is executed with bash under a fake Slurm (``sbatch``,
``srun`` and ``scontrol`` stand-ins on PATH that record their arguments, ``srun`` also running its command),
the SLURM_* variables Slurm sets, a tiny model and a tiny corpus. Checked: the scripts parse, the covedit
commands they run resolve and finish with a complete store, the array's reduction waits on the array
(afterok), and USR1 sent to the batch shell reaches covedit, which checkpoints and exits 75, and the script
requeues its job."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covedit.stats.store import StatsStore

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"
SCRIPTS = ["single_node.sbatch", "array_shards.sbatch", "reduce.sbatch", "multinode_dask.sbatch", "submit_array.sh"]
TOKENS = 12000
SMALL = 4000  # for the runs that need not be hit part way through
# Tiny batches and settings so that a tiny model's run takes seconds (and can be hit part way through).
STATS_ARGS = "--max-length 64 --batch-tokens 256 --window-docs 8 --threads 1 --checkpoint-every 1000"


RECORD = f'{sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> "$FAKE_SLURM_LOG/$(basename "$0").jsonl"'
FAKES = {
    # --parsable prints the job id; ids count up from 1000 so that each call's id is known.
    "sbatch": RECORD + """
n=$(cat "$FAKE_SLURM_LOG/sbatch.jsonl" | wc -l)
echo $((1000 + n))
""",
    "scontrol": RECORD + "\n",
    # Drops srun's own options (all written --opt=value), runs --ntasks copies with SLURM_PROCID/LOCALID set
    # and passes TERM/INT on to them, as srun does.
    "srun": RECORD + """
n=1
while [[ $# -gt 0 && $1 == -* ]]; do case $1 in --ntasks=*|-n=*) n=${1#*=};; esac; shift; done
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" & pids+=($!); done
rc=0
for pid in "${pids[@]}"; do
  while :; do wait "$pid"; r=$?; kill -0 "$pid" 2>/dev/null || break; done
  ((r == 0)) || rc=$r
done
exit $rc
""",
}


class FakeSlurm:
    """A bin folder of fake Slurm commands and the environment a batch script sees under Slurm."""

    def __init__(self, root: Path, tiny_dir: Path, corpus_file: Path) -> None:
        self.bin = root / "fake-bin"
        self.log = root / "slurm-calls"
        self.work = root / "work"  # the submit directory
        for d in (self.bin, self.log, self.work):
            d.mkdir()
        for name, body in FAKES.items():
            path = self.bin / name
            path.write_text("#!/bin/bash\n" + body)
            path.chmod(0o755)
        self.stats_dir = root / "stats"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env = {
            **env, "PATH": f"{self.bin}:{Path(sys.executable).parent}:{env['PATH']}", "FAKE_SLURM_LOG": str(self.log),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "covedit-test", "SLURM_SUBMIT_DIR": str(self.work),
            "SLURM_JOB_NODELIST": socket.gethostname(), "SLURM_NNODES": "1", "SLURM_RESTART_COUNT": "0",
            "MODEL": str(tiny_dir), "CORPUS": str(corpus_file), "STATS_DIR": str(self.stats_dir),
            "TOKENS": str(TOKENS), "DEVICE": "cpu", "STATS_ARGS": STATS_ARGS,
        }

    def calls(self, command: str) -> list[list[str]]:
        path = self.log / f"{command}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def run(self, script: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        out = subprocess.run(["bash", str(SLURM / script)], cwd=self.work, env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=timeout)
        return out

    def popen(self, script: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(["bash", str(SLURM / script)], cwd=self.work, env={**self.env, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def slurm(tmp_path, tiny_dir, corpus_file) -> FakeSlurm:
    return FakeSlurm(tmp_path, tiny_dir, corpus_file)


def json_objects(text: str) -> list[dict]:
    """Every top-level JSON object printed in a log (covedit --json prints indented objects)."""
    decoder, found = json.JSONDecoder(), []
    for m in re.finditer(r"^\{", text, flags=re.M):
        try:
            found.append(decoder.raw_decode(text, m.start())[0])
        except ValueError:
            continue
    return found


def only_store(stats_dir: Path) -> StatsStore:
    stores = sorted(stats_dir.glob("*.zarr"))
    assert len(stores) == 1, stores
    return StatsStore.open(stores[0], verify=False)


def assert_complete(store: StatsStore, tokens: int = TOKENS) -> dict:
    store = StatsStore.open(store.path, full_check=True)
    assert store.is_complete()
    sums = {L: store.read_layer(L) for L in store.layers}
    assert store.layers == [1, 2, 3]  # the layers batch-edit edits in a 4-layer model
    assert all(count == tokens for _, count in sums.values())
    return sums


# --------------------------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_has_the_slurm_settings(script):
    text = (SLURM / script).read_text()
    subprocess.run(["bash", "-n", str(SLURM / script)], check=True)
    if script.endswith(".sbatch"):
        directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
        assert "--signal=B:USR1@300" in directives and "--requeue" in directives
        assert any(d.startswith("--output=logs/") for d in directives)
        for var in ("MODEL", "STATS_DIR", "TOKENS"):
            assert re.search(rf"^{var}=\${{{var}:-", text, flags=re.M), f"{var} has no default at the top"
        assert "trap 'forward USR1' USR1" in text and 'scontrol requeue "${SLURM_JOB_ID}"' in text


# --------------------------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_single_node_builds_stats_then_edits(slurm):
    # One "GPU" (one worker, no dask): the LocalCluster path runs in test_shards_faults and the multinode test.
    out = slurm.run("single_node.sbatch", {"SLURM_GPUS_ON_NODE": "1", "OUTPUT": "edited", "TOKENS": str(SMALL),
                                           "FACTS": str(ROOT / "examples" / "facts.jsonl"),
                                           "EDIT_ARGS": "--no-eval --set target.steps=3"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "--device cpu --max-length 64" in out.stderr and "--workers 1" in out.stderr  # run() echoes commands
    summary, edit = json_objects(out.stdout)
    assert summary["status"] == "cached" and summary["tokens"] == SMALL
    assert_complete(only_store(slurm.stats_dir), SMALL)
    assert edit["n_facts"] == 6 and edit["stats"]["path"] == summary["path"]
    assert (slurm.work / "edited" / "delta.safetensors").exists() and (slurm.work / "edited" / "manifest.json").exists()
    assert slurm.calls("scontrol") == []


def test_submit_array_passes_the_dependency(slurm):
    out = subprocess.run(["bash", str(SLURM / "submit_array.sh"), "--partition=gpu"], cwd=slurm.work,
                         env=slurm.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    first, second = slurm.calls("sbatch")
    assert first == ["--parsable", "--partition=gpu", str(SLURM / "array_shards.sbatch")]
    assert second == ["--parsable", "--dependency=afterok:1001", "--partition=gpu", str(SLURM / "reduce.sbatch")]
    assert (slurm.work / "logs").is_dir()  # Slurm would not create the --output folder
    assert "array job 1001" in out.stdout


@pytest.mark.slow
def test_array_task_requeues_on_usr1_then_array_and_reduce_complete(slurm):
    """USR1 to the batch shell of task 0 -> covedit checkpoints, exits 75 -> scontrol requeue; the requeued
    task resumes, task 1 runs, the reduction completes the store with every token counted once."""
    array = {"SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0",
             "SLURM_ARRAY_TASK_MAX": "1"}
    # Small batches keep the first run going long enough to be hit (batch size is not part of the store's key).
    slow = STATS_ARGS.replace("--batch-tokens 256", "--batch-tokens 64")
    first = slurm.popen("array_shards.sbatch", {**array, "SLURM_ARRAY_TASK_ID": "0", "STATS_ARGS": slow})
    deadline = time.time() + 120
    position = None
    while time.time() < deadline and first.poll() is None and not position:
        stores = list(slurm.stats_dir.glob("*.zarr"))
        if stores:
            try:
                position = StatsStore.open(stores[0], verify=False).checkpoint_position(0, 2)
            except Exception:  # noqa: BLE001 (store being created)
                position = None
        time.sleep(0.02)
    assert first.poll() is None and position, "the shard finished before it could be interrupted"
    first.send_signal(signal.SIGUSR1)  # to the batch shell only, as --signal=B:USR1 does
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    assert "requeueing job 4242" in stderr and "exit 75" in stderr
    assert slurm.calls("scontrol") == [["requeue", "4242"]]
    store = only_store(slurm.stats_dir)
    stopped_at = store.checkpoint_position(0, 2)
    assert not stopped_at["done"] and 0 < stopped_at["tokens"] < TOKENS and not store.is_complete()

    requeued = slurm.run("array_shards.sbatch", {**array, "SLURM_ARRAY_TASK_ID": "0", "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    other = slurm.run("array_shards.sbatch", {**array, "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "4243"})
    assert other.returncode == 0, other.stderr[-3000:]
    assert [s["status"] for s in json_objects(requeued.stdout) + json_objects(other.stdout)] == ["shard-done"] * 2
    assert not store.is_complete() and store.finished_shards(2) == [0, 1]

    reduced = slurm.run("reduce.sbatch", {"SLURM_JOB_ID": "4244"})
    assert reduced.returncode == 0, reduced.stderr[-3000:]
    (summary,) = json_objects(reduced.stdout)
    assert summary["status"] == "reduced" and summary["path"] == str(store.path)
    assert_complete(store)
    assert slurm.calls("scontrol") == [["requeue", "4242"]]  # only the interrupted task requeued


@pytest.mark.slow
def test_multinode_dask_runs_a_scheduler_workers_and_the_coordinator(slurm):
    """The scheduler and two workers start through (fake) srun on this machine, on the loopback address."""
    out = slurm.run("multinode_dask.sbatch", {"SLURM_NTASKS": "2", "DASK_ARGS": "--host 127.0.0.1",
                                              "TOKENS": str(SMALL)}, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    scheduler, workers = slurm.calls("srun")
    assert scheduler[:4] == ["--nodes=1", "--ntasks=1", "--overlap", "--kill-on-bad-exit=1"]
    assert scheduler[4:6] == ["dask", "scheduler"] and "--host" in scheduler
    assert workers[:3] == ["--ntasks=2", "--overlap", "--kill-on-bad-exit=1"] and workers[3:5] == ["bash", "-c"]
    m = re.search(r"--workers 2 --scheduler (tcp://127\.0\.0\.1:\d+)", out.stderr)
    assert m, out.stderr[-3000:]
    (summary,) = json_objects(out.stdout)
    assert summary["status"] == "cached"
    store = only_store(slurm.stats_dir)
    assert_complete(store, SMALL)
    assert StatsStore.open(store.path)._attrs()["n_shards"] == 2  # one shard per worker
    assert not list(slurm.stats_dir.glob("dask-scheduler-*.json"))  # the cluster was taken down
