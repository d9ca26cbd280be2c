"""metanet: meta-learning task-specific neural networks."""
