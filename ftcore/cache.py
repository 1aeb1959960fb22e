"""Where ft keeps what it builds once and reuses across runs: built-in models, dequantized GGUF bases."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$FT_CACHE_DIR, else ~/.cache/ft."""
    return Path(os.environ.get("FT_CACHE_DIR", Path.home() / ".cache" / "ft"))
