"""Dynamic micro-batching: pure policy, bounded queue, async driver."""
