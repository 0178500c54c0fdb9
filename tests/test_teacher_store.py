"""TeacherStore: concurrent writers in separate processes, exact read-back, laziness, restarts."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch

from megatron_opd.data.trajectories import TeacherSignals
from megatron_opd.runtime.spawn import spawn_world
from megatron_opd.teachers.store import StoreError, TeacherStore

SAMPLES, R, D, K = 24, 40, 8, 4
STEPS = (0, 1, 2)


def make_signals(step: int, rank: int) -> tuple[list[str], list[TeacherSignals]]:
    """Deterministic signals of one rank's batch: teachers 'h' (hidden), 'k' (top-k), 's' (sampled)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = [f"step{step}/rank{rank}/{i}" for i in range(SAMPLES)]
    lens = torch.randint(0, R + 1, (SAMPLES,), generator=g)
    lens[0] = 0  # an empty response is stored too
    out = []
    for t, (name, kind) in enumerate((("h", "hidden"), ("k", "topk"), ("s", "sampled"))):
        rows = torch.arange(t, SAMPLES, 3)
        n, rl = len(rows), lens[rows]
        mask = (torch.arange(R)[None] < rl[:, None]).float()
        fields = {}
        if kind == "hidden":
            fields["hidden"] = torch.randn(n, R, D, generator=g) * mask[..., None]
        elif kind == "topk":
            fields["topk_ids"] = torch.randint(0, 1000, (n, R, K), generator=g) * mask[..., None].long()
            fields["topk_logprobs"] = -torch.rand(n, R, K, generator=g).sort(-1).values * mask[..., None]
        else:
            fields["sampled_logprobs"] = -torch.rand(n, R, generator=g) * mask
        out.append(TeacherSignals(teacher=name, kind=kind, rows=rows, response_lens=rl, weight_version=f"v{step}", **fields))
    return ids, out


def write_rank(root: str, hidden_dtype: str) -> int:
    """One rank of the spawned world: write every step's part, all ranks at the same time."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = TeacherStore(root, hidden_dtype=hidden_dtype, chunk_bytes=256)  # small chunks: many files
    # A file barrier, so that the ranks really write at the same time (spawn start-up varies).
    Path(root, f".ready{rank}").touch()
    deadline = time.monotonic() + 60
    while not all(Path(root, f".ready{r}").exists() for r in range(world)):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for step in STEPS:
        ids, sigs = make_signals(step, rank)
        assert store.write(step, rank, ids, sigs)
    return rank


def expected(sample_id: str) -> tuple[str, dict[str, torch.Tensor]]:
    step, rank, i = (int(x.removeprefix("step").removeprefix("rank")) for x in sample_id.split("/"))
    ids, sigs = make_signals(step, rank)
    for sig in sigs:
        hit = (sig.rows == i).nonzero()
        if len(hit):
            b = int(hit[0, 0])
            n = int(sig.response_lens[b])
            keys = {"hidden": ["hidden"], "topk": ["topk_ids", "topk_logprobs"], "sampled": ["sampled_logprobs"]}[sig.kind]
            return sig.teacher, {k: getattr(sig, k)[b, :n] for k in keys}
    raise KeyError(sample_id)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    assert spawn_world(write_rank, 2, args=(str(root), "float32"), timeout_s=120) == [0, 1]
    return root


def test_two_processes_write_concurrently_and_every_row_reads_back(written):
    store = TeacherStore(written)
    assert store.steps() == list(STEPS) and store.parts(1) == [0, 1]
    for step in STEPS:
        reader = store.open_step(step)
        assert len(reader.sample_ids) == 2 * SAMPLES
        ids = list(reader.sample_ids)
        random.Random(step).shuffle(ids)
        signals = reader.read(ids, width=R)
        assert sorted(s.teacher for s in signals) == ["h", "k", "s"]
        assert sum(len(s.rows) for s in signals) == 2 * SAMPLES  # no row lost
        for sig in signals:
            assert sig.weight_version == f"v{step}"
            for b, pos in enumerate(sig.rows.tolist()):
                teacher, want = expected(ids[pos])
                assert teacher == sig.teacher and int(sig.response_lens[b]) == len(next(iter(want.values())))
                for key, value in want.items():
                    got = getattr(sig, key)[b]
                    n = value.shape[0]
                    assert torch.equal(got[:n], value.to(got.dtype)), (ids[pos], key)
                    assert not got[n:].any()  # zero padding to the requested width


def test_reading_is_lazy_by_sample(written):
    store = TeacherStore(written)
    reader = store.open_step(2)
    # Destroy every chunk of teacher 'h' in rank 1's part: samples elsewhere still read.
    for chunk in (written / "step_00000002" / "part_0001" / "h" / "hidden" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    (sig,) = reader.read(["step2/rank0/3"])  # teacher 'h' in rank 0's part
    teacher, want = expected("step2/rank0/3")
    assert sig.teacher == teacher == "h" and torch.equal(sig.hidden[0], want["hidden"])
    (sig,) = reader.read(["step2/rank1/4"])  # teacher 'k' in rank 1's part
    assert torch.equal(sig.topk_ids[0], expected("step2/rank1/4")[1]["topk_ids"])
    with pytest.raises(Exception):
        reader.read(["step2/rank1/3"])
    with pytest.raises(StoreError, match="no stored signal for sample 'step9/x'"):
        reader.read(["step9/x"])


def test_restart_rewrites_nothing_and_redoes_interrupted_parts(tmp_path):
    store = TeacherStore(tmp_path, hidden_dtype="float16")
    ids, sigs = make_signals(5, 0)
    assert store.write(5, 0, ids, sigs) is True
    part = store.part_dir(5, 0)
    before = {p: p.stat().st_mtime_ns for p in part.rglob("*")}
    restarted = TeacherStore(tmp_path, hidden_dtype="float16")
    assert restarted.is_written(5, 0) and restarted.write(5, 0, ids, sigs) is False
    assert {p: p.stat().st_mtime_ns for p in part.rglob("*")} == before
    with pytest.raises(StoreError, match="differ from the 23 given now"):
        restarted.write(5, 0, ids[:-1], sigs)
    # A part without COMPLETE (a crash mid-write) is invisible, then written again from scratch.
    ids1, sigs1 = make_signals(5, 1)
    half = store.part_dir(5, 1)
    (half / "h").mkdir(parents=True)
    (half / "zarr.json").write_text("{")
    assert restarted.parts(5) == [0]
    assert restarted.write(5, 1, ids1, sigs1) is True and restarted.parts(5) == [0, 1]
    (sig,) = [s for s in restarted.read(5, ["step5/rank1/0", "step5/rank1/3"]) if s.teacher == "h"]
    assert sig.hidden.dtype == torch.float16
    assert torch.equal(sig.hidden[1, : int(sig.response_lens[1])], expected("step5/rank1/3")[1]["hidden"].half())
    meta = (part / "h" / "hidden" / "zarr.json").read_text()
    assert '"blosc"' in meta and '"zstd"' in meta  # compressed
