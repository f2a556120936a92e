"""Everything that knows about ranks: the topology, the DeepSpeed engine, tensor parallelism."""
