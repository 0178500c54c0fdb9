"""`Scorer`: where a stage's teacher signals come from.

The HTTP `TeacherPool` (teachers/pool.py) is one implementation; in-job teachers (loaded on
demand in the training job's own runtime) will be another. The OPD stage calls it on the first
rank of each data-parallel replica and shares the result with the replica.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from megatron_opd.data.trajectories import TeacherSignals, Trajectories


@runtime_checkable
class Scorer(Protocol):
    def route(self, traj: Trajectories) -> Trajectories:
        """Fill `traj.teacher` (the teacher of each row, from its domain); returns `traj`."""
        ...

    def score(self, traj: Trajectories) -> list[TeacherSignals]:
        """One `TeacherSignals` per teacher in the routed batch, rows indexing `traj`."""
        ...

    def close(self) -> None: ...
