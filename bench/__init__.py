"""Benchmarks and tools around edgeav: decode throughput, the synthetic world, demo training."""
