"""Everything that talks across replicas under a `tf.distribute` strategy.

A synchronized batch norm needs two cross-replica exchanges a step, each carrying only
per-channel numbers: the moments of every replica in the forward pass, and two sums
(Σdy, Σdy·x̂) in the backward pass. Both are single collectives:

- moments are all-gathered (each replica writes its (count, shift, offset, variance) into its
  own slot of a zero tensor, and one all-reduce SUM fills every slot), then merged
  exactly with `ops.merge_moments` -- never E[x²] - E[x]²;
- sums are one all-reduce SUM (or, with replica groups, the same gather followed by
  a sum over the group's slots).

Replicas with no examples (a last partial batch) contribute count 0 and change
nothing.
"""

import tensorflow as tf

from kerasbn import ops


class ReplicaGroup:
    """The replicas whose statistics this replica shares, and how to combine with them.

    Args:
        context: the `tf.distribute.ReplicaContext` of the running replica.
        group_size: how many consecutive replicas share statistics; None for all.
    """

    def __init__(self, context, group_size=None):
        self.context = context
        self.num_replicas = context.num_replicas_in_sync
        self.group_size = group_size or self.num_replicas
        self.replica_id = context.replica_id_in_sync_group

    @property
    def spans_all_replicas(self):
        return self.group_size == self.num_replicas

    def _gather_group(self, value):
        """One all-reduce that returns the group's values stacked: [group_size, ...]."""
        slots = tf.one_hot(self.replica_id, self.num_replicas, dtype=value.dtype)
        slots = tf.reshape(slots, [self.num_replicas] + [1] * value.shape.rank)
        gathered = self.context.all_reduce(tf.distribute.ReduceOp.SUM, slots * value)
        if self.spans_all_replicas:
            return gathered
        start = (self.replica_id // self.group_size) * self.group_size
        return gathered[start:start + self.group_size]

    def merge_moments(self, count, shift, offset, variance):
        """The moments of the group's whole batch from this replica's own.

        Args:
            count, shift, offset, variance: this replica's statistics as
                `ops.shifted_moments` returns them, channel shape.

        Returns:
            `(count, mean, variance)` of the group's concatenated batch, identical on
            every replica of the group.
        """
        parts = self._gather_group(tf.stack([count, shift, offset, variance], axis=0))
        return ops.merge_moments(*tf.unstack(parts, axis=1))

    def sum(self, value):
        """The sum of `value` over the replicas of the group (one collective)."""
        if self.spans_all_replicas:
            return self.context.all_reduce(tf.distribute.ReduceOp.SUM, value)
        return tf.reduce_sum(self._gather_group(value), axis=0)


def replica_group(group_size=None):
    """The group this replica synchronizes with, or None when there is nothing to sync.

    None outside any strategy, in a cross-replica context, and with one replica:
    synchronized batch norm then behaves exactly like the unsynchronized one.

    Args:
        group_size: replicas per group (a divisor of the number of replicas), or None
            for one group of every replica.

    Returns:
        A `ReplicaGroup` or None.

    Raises:
        ValueError: when `group_size` does not divide the number of replicas.
    """
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    num_replicas = context.num_replicas_in_sync
    if num_replicas == 1:
        return None
    if group_size is not None and num_replicas % group_size:
        raise ValueError(
            f"sync_group_size={group_size} does not divide the {num_replicas} replicas "
            "in sync; use a divisor of the number of replicas, or None for all."
        )
    return ReplicaGroup(context, group_size)
