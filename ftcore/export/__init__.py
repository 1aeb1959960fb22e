"""`ft export`: merge adapters and consolidate checkpoints into plain HF safetensors, out of core."""
