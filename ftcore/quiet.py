"""Library messages that are noise for every ft user, filtered at their logger, narrowly.

bitsandbytes (0.50, CPU with AVX512-BF16) tries at import to fetch an optional CPU 4-bit GEMM kernel from the
Hugging Face hub through the `kernels` package, and warns "Failed to load CPU gemm_4bit_forward from
kernels-community" when `kernels` is not installed, refuses the kernel's repository as untrusted remote code, or
cannot reach the hub: on every ft command, although
bitsandbytes then uses its own kernel and nothing is wrong. Only that warning, with one of those causes, is
dropped; the same warning for any other cause (e.g. an installed `kernels` that fails) still shows, as does
everything else the logger says.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
_KERNEL_HUB_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"
# The causes that only mean "the optional kernel is not available here".
_HARMLESS_CAUSES = ("No module named 'kernels'", "could not verify publisher trust", "offline",
                    "Max retries exceeded", "Failed to resolve", "Connection", "LocalEntryNotFoundError",
                    "couldn't connect")


class _OptionalKernelMissing(logging.Filter):
    """Drops bitsandbytes' optional-kernel warning when the cause is a missing package or no hub."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_KERNEL_HUB_WARNING):
            return True
        cause = " ".join(str(a) for a in (record.args or ()))
        return not any(c.lower() in cause.lower() for c in _HARMLESS_CAUSES)


def install_filters() -> None:
    """Install the filters once (idempotent); called when ftcore is imported, before bitsandbytes is."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _OptionalKernelMissing) for f in logger.filters):
        logger.addFilter(_OptionalKernelMissing())
