"""`Scorer`: what an on-policy stage needs from its teachers, whatever serves them.

    routed = scorer.route(batch)          # fills batch.teacher from each row's domain
    signals = scorer.score(routed)        # one TeacherSignals per teacher present in the batch

Two implementations, one per `teachers.<name>.placement`:
- `teachers.pool.TeacherPool` (server: HTTP, SGLang's protocol) is not collective: only the
  replica's first model-parallel rank calls `score`, and the stage shares the result with the
  rest of the replica;
- `teachers.in_job.InJobTeachers` (in_job: megatron models inside the training job) is
  collective: every rank of the data-parallel replica calls `score` with the same batch (the
  model's forward is TP/PP-parallel) and every one gets the signals.
A job with both placements holds one of each; `route_by_domain` routes over all of them.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from megatron_opd.data.trajectories import TeacherSignals, Trajectories


class RoutingError(ValueError):
    """A trajectory's domain (or teacher) is not one the scorer knows."""


@runtime_checkable
class Scorer(Protocol):
    # True: every rank of the replica calls `score` (models in the job); False: only the
    # replica's first rank does (HTTP clients), and the stage broadcasts what it returns.
    collective: ClassVar[bool]

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


def route_by_domain(batch: Trajectories, domain_owner: dict[str, str]) -> Trajectories:
    """Fill `batch.teacher` from each row's domain (in place; returns `batch`)."""
    names = []
    for i, domain in enumerate(batch.domain):
        if domain not in domain_owner:
            raise RoutingError(
                f"trajectory {batch.sample_ids[i]!r} has domain {domain!r}, which no teacher owns; "
                f"known domains: {sorted(domain_owner)}"
            )
        names.append(domain_owner[domain])
    batch.teacher = names
    return batch


def rows_by_teacher(batch: Trajectories, known: set[str] | dict) -> dict[str, list[int]]:
    """The rows of each teacher in a routed batch, teachers in order of first appearance; a row
    routed to a teacher outside `known` is a RoutingError."""
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(batch.teacher):
        if name not in known:
            raise RoutingError(f"trajectory {batch.sample_ids[i]!r} names teacher {name!r}; this scorer has {sorted(known)}")
        rows_of.setdefault(name, []).append(i)
    return rows_of
