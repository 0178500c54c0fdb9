"""`Scorer`: what an on-policy stage needs from its teachers, whatever serves them.

    routed = scorer.route(batch)          # fills batch.teacher from each row's domain
    signals = scorer.score(routed)        # one TeacherSignals per teacher present in the batch

`teachers.pool.TeacherPool` (HTTP, SGLang's protocol) is one implementation; in-job teachers
(loaded on demand inside the training job) will be another. Both run on the replica's first
model-parallel rank, which broadcasts the result to the rest of its replica.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from megatron_opd.data.trajectories import TeacherSignals, Trajectories


@runtime_checkable
class Scorer(Protocol):
    def route(self, batch: Trajectories) -> Trajectories:
        """Fill `batch.teacher` (the teacher of each row) in place and return `batch`; an unknown
        domain is an error, never a default."""
        ...

    def score(self, batch: Trajectories) -> list[TeacherSignals]:
        """The teachers' signals for a routed batch, one `TeacherSignals` per teacher, its rows
        indexing `batch`, aligned with the response tokens (data/trajectories.py)."""
        ...

    def close(self) -> None:
        """Release connections, threads or models."""
        ...
