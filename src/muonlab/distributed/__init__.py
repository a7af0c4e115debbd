"""Layer 3: distributed Muon on ``torch.distributed`` (DDP, replicated, FSDP2, HSDP, TP, EP).

Under a process group, every logical Muon matrix has exactly one *owner* rank that
orthogonalizes it. The engine has two parts with a small interface:

* :mod:`.plan` (:func:`build_plan`): from each parameter's :mod:`.layout` (which rank holds which
  elements: plain tensors are held whole by every rank, ``DTensor`` shards follow their mesh and
  placements), which rank owns each logical matrix (FLOP-balanced among the ranks that hold it),
  which pieces travel where, and in which byte-bounded round;
* :mod:`.redistribute` (:func:`redistribute`): per round, one ``all_to_all`` sends each rank's
  pieces of the direction to the owners, the owners orthogonalize (stacked by shape), and a second
  ``all_to_all`` returns to every rank only the update of the pieces it holds.

So per rank, memory and traffic shrink with the world size; a matrix held whole by its owner (an
expert under expert parallelism, a head under tensor parallelism, any matrix at one rank) needs no
communication. Replicated parameters (DDP) are the case where every rank holds everything: the
owner's result goes to every rank, in bounded rounds.

Participation is agreed with one small ``all_reduce`` per step (a parameter takes a Muon step only
if every rank has its gradient; gradient finiteness is agreed in the same call), so every rank
issues the same collectives in the same order and nothing hangs when a rank lacks a gradient.

:class:`muonlab.Muon` calls this; without an initialized process group it never does.
"""

from .common import CollectiveError, agree, collective, comm_device, is_dtensor, local, matrix_cost, resolve_group
from .layout import Layout, check_replicas, is_submesh, layout_of, shard_indices
from .plan import MatrixPlan, Piece, ShardPlan, assign_owners, build_plan
from .redistribute import redistribute

__all__ = [
    "agree", "comm_device", "is_dtensor", "local", "matrix_cost", "resolve_group",
    "Layout", "check_replicas", "is_submesh", "layout_of", "shard_indices",
    "MatrixPlan", "Piece", "ShardPlan", "assign_owners", "build_plan",
    "collective", "redistribute",
]
