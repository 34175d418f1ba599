"""Crash safety, proven by killing: a writer (``jw.save`` of a sharded folder, ``jw.save_file``, the CLI's
``convert``) is SIGKILLed at random points of a save (fixed seed). After every kill the target loads
bit-identical to the previous version or to the new one, the files beside a checkpoint are untouched,
and after the next complete save no temporary entry is left.

Writers are forked from one harness process that imported jaxweights once (`harness`), so a kill costs
milliseconds rather than an interpreter start. `kill_loop` also drives `benchmarks/crash_loop.py`, which
runs hundreds of kills.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pytest

import jaxweights as jw
from jaxweights import cli
from tests.test_save import tensors_in

REPO = Path(__file__).resolve().parents[1]
WRITERS = ("save", "save_file", "convert")
KEPT = {"config.json": b'{"hidden": 1024}', "tokenizer/vocab.txt": b"a\nb\nc\n"}
"""Files beside the ``save`` writer's checkpoint: every kill must leave them as they are."""


def versions() -> list[dict[str, np.ndarray]]:
    """The two versions saved in turn: different names, values and, for ``save``, shard counts (3 and 2)."""
    rng = np.random.default_rng(0)
    return [
        {f"v{number}.w{i}": rng.standard_normal(1024).astype(np.float32) for i in range(count)}
        for number, count in enumerate((6, 4))
    ]


def target_of(writer: str, root: Path) -> Path:
    return root / {"save": "ckpt", "save_file": "model.safetensors", "convert": "out.safetensors"}[writer]


def prepare(writer: str, root: Path) -> None:
    """The files a writer needs before its first save: the CLI's two sources, the checkpoint's neighbours."""
    if writer == "convert":
        for number, tensors in enumerate(versions()):
            jw.save_file(tensors, root / "src" / f"v{number}.safetensors")
    if writer == "save":
        for name, data in KEPT.items():
            (root / "ckpt" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "ckpt" / name).write_bytes(data)


def save_version(writer: str, root: Path, number: int, tensors: dict[str, np.ndarray]) -> None:
    target = target_of(writer, root)
    if writer == "save":
        jw.save(tensors, target, max_shard_size=9000)  # two 4 KiB tensors a shard
    elif writer == "save_file":
        jw.save_file(tensors, target)
    elif cli.main(["convert", str(root / "src" / f"v{number}.safetensors"), str(target)]) != 0:
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------
# The harness: its own process, forks one writer per command
# ---------------------------------------------------------------------------------------------


def harness(writer: str, root: str) -> None:
    """Answers one line per command read from stdin:

    - ``time N``: forks a writer that saves version N; answers the seconds the save took;
    - ``kill N DELAY``: forks a writer that saves version N and SIGKILLs it DELAY seconds into the save;
      answers ``killed``, or ``completed`` when the save finished first;
    - ``save N``: forks a writer that saves version N; answers ``saved`` (else the exit status).
    """
    every = versions()
    for line in sys.stdin:
        command, number, *rest = line.split()
        pid, ready = _fork_writer(writer, Path(root), int(number), every[int(number)])
        if command == "kill":
            time.sleep(float(rest[0]))
            os.kill(pid, signal.SIGKILL)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if command == "time":
            answer = ready.read().decode() if status == 0 else f"exited {status}"
        elif command == "kill":
            answer = {-signal.SIGKILL: "killed", 0: "completed"}.get(status, f"exited {status}")
        else:
            answer = "saved" if status == 0 else f"exited {status}"
        print(answer, flush=True)
        ready.close()


def _fork_writer(
    writer: str, root: Path, number: int, tensors: dict[str, np.ndarray]
) -> tuple[int, IO[bytes]]:
    """Forks a process that warms up (jax's backend for ``save``), says so on a pipe, saves once, and
    writes the seconds the save took to the pipe."""
    read, write = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the CLI prints; stdout is the harness's answers
            if writer == "save":
                import jax

                jax.process_index()
            os.write(write, b"r")
            start = time.perf_counter()
            save_version(writer, root, number, tensors)
            os.write(write, f"{time.perf_counter() - start:.6f}".encode())
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    os.close(write)
    ready = os.fdopen(read, "rb")
    ready.read(1)
    return pid, ready


# ---------------------------------------------------------------------------------------------
# The loop, run from pytest or the benchmark
# ---------------------------------------------------------------------------------------------


def loaded_version(writer: str, root: Path) -> int:
    """The version the target holds, bit for bit; fails if it holds neither or a mixture, or if the
    checkpoint folder holds other files than one version's and its neighbours."""
    target = target_of(writer, root)
    found = tensors_in(target)
    matches = [
        number
        for number, tensors in enumerate(versions())
        if found == {name: value.tobytes() for name, value in tensors.items()}
    ]
    assert len(matches) == 1, f"{target} holds neither version: {sorted(found)}"
    if writer == "save":
        shards = len(versions()[matches[0]]) // 2
        names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        assert sorted(os.listdir(target)) == sorted(
            [*names, "model.safetensors.index.json", "config.json", "tokenizer"]
        )
        assert {name: (target / name).read_bytes() for name in KEPT} == KEPT
    return matches[0]


def stray_entries(writer: str, root: Path) -> list[str]:
    """Everything beside the target that is not the target (nor the CLI's sources)."""
    return sorted(set(os.listdir(root)) - {target_of(writer, root).name, "src"})


def kill_loop(
    writer: str, root: Path, kills: int, seed: int, log: Callable[[str], None] | None = None
) -> Counter[str]:
    """Kills ``writer`` ``kills`` times at random points of a save and checks the target after each.

    Each round: the target holds version P; a writer saving version 1-P is SIGKILLed after a random delay
    (uniform over the save's median duration); the target must load as P or 1-P exactly; then one
    complete save of 1-P must leave no temporary entry beside the target (except for ``convert``: the CLI
    writes through ``write_file`` and leaves its leftovers to the next ``jw.save_file``, checked at the end).

    Returns:
        Counts: ``previous version`` (killed before the swap), ``new version`` (killed after it),
        ``completed before the kill``, ``kills that left temporary entries``, ``stray entries left``.
    """
    root.mkdir(parents=True, exist_ok=True)
    prepare(writer, root)
    errors = root.parent / f"{root.name}-harness-stderr.txt"
    command = f"from tests.test_crash_safety import harness; harness({writer!r}, {str(root)!r})"
    with (
        open(errors, "w") as stderr,
        subprocess.Popen(
            [sys.executable, "-c", command],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as process,
    ):
        assert process.stdin is not None and process.stdout is not None
        questions, answers = process.stdin, process.stdout

        def ask(command: str) -> str:
            questions.write(command + "\n")
            questions.flush()
            answer = answers.readline().strip()
            assert answer and not answer.startswith("exited"), (
                f"{command!r}: {answer!r}\n{errors.read_text()}"
            )
            return answer

        try:
            outcomes = _rounds(writer, root, kills, seed, ask)
        except BaseException:
            process.kill()  # a harness stuck on a writer would otherwise keep the exit waiting
            raise
        questions.close()  # the harness ends at the end of its input
    median = outcomes.pop("median save (us)")
    if log is not None:
        log(f"{writer}: median save {median / 1e3:.1f} ms")
    return outcomes


def _rounds(writer: str, root: Path, kills: int, seed: int, ask: Callable[[str], str]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    assert ask("save 0") == "saved"
    duration = statistics.median(float(ask(f"time {i % 2}")) for i in range(1, 6))  # ends holding 1
    outcomes["median save (us)"] = round(duration * 1e6)
    rng = random.Random(seed)
    for _ in range(kills):
        previous = loaded_version(writer, root)
        new = 1 - previous
        before = stray_entries(writer, root)
        answer = ask(f"kill {new} {rng.uniform(0, duration):.6f}")
        found = loaded_version(writer, root)
        if answer == "completed":
            assert found == new
            outcomes["completed before the kill"] += 1
        else:
            outcomes["previous version" if found == previous else "new version"] += 1
        outcomes["kills that left temporary entries"] += bool(set(stray_entries(writer, root)) - set(before))
        assert ask(f"save {new}") == "saved"
        assert loaded_version(writer, root) == new
        if writer != "convert":
            left = stray_entries(writer, root)
            assert not left, f"the save after a kill left {left}"
    if writer == "convert":  # what killed converts left, removed by the next save of the file
        jw.save_file(versions()[0], target_of(writer, root))
    outcomes["stray entries left"] = len(stray_entries(writer, root))
    return outcomes


@pytest.mark.parametrize("writer", WRITERS)
def test_a_killed_save_leaves_one_whole_version_and_the_next_save_cleans_up(
    tmp_path: Path, writer: str
) -> None:
    outcomes = kill_loop(writer, tmp_path / writer, kills=20, seed=0)
    assert (
        sum(outcomes[key] for key in ("previous version", "new version", "completed before the kill")) == 20
    )
    assert outcomes["kills that left temporary entries"] > 0  # the kills did land inside saves
    assert outcomes["stray entries left"] == 0


def test_the_cli_removes_what_killed_converts_left(tmp_path: Path) -> None:
    source = jw.save_file(versions()[0], tmp_path / "src" / "v0.safetensors")
    stale = tmp_path / ".out.safetensors.q1w2e3r4.tmp"  # write_file's name for a temporary of out.safetensors
    stale.write_bytes(b"half-written")
    assert cli.main(["convert", str(source), str(tmp_path / "out.safetensors")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "src"]
