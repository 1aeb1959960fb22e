"""Streaming training data: sources, record formats, chat templates, loss masks, packing, sharding, resume."""
