"""TinyFusion library: runtime/DDP, checkpoint I/O, data stores, training loop, pruning, metrics."""
