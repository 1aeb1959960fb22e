"""bitsandbytes' optional-kernel warning is dropped at its logger only for its harmless causes; the rest shows."""

import logging
import subprocess
import sys

from ftcore.quiet import BNB_CPU_LOGGER, install_filters
from tests.conftest import ROOT

MESSAGE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
           "kernels` and the kernels >= 0.11.1")


def test_only_the_harmless_causes_of_the_kernel_warning_are_dropped(caplog):
    install_filters()
    install_filters()  # idempotent
    logger = logging.getLogger(BNB_CPU_LOGGER)
    assert sum(type(f).__name__ == "_OptionalKernelMissing" for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=BNB_CPU_LOGGER):
        logger.warning(MESSAGE, "No module named 'kernels'")
        logger.warning(MESSAGE, "Kernel repository 'kernels-community/quantization-bitsandbytes' could not verify "
                                "publisher trust status. Set trust_remote_code=True ...")
        logger.warning(MESSAGE, "ImportError: undefined symbol: gemm_4bit_forward_v2")  # a real failure
        logger.warning("Something else went wrong")
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 2 and "undefined symbol" in shown[0] and shown[1] == "Something else went wrong"


def test_importing_ftcore_then_bitsandbytes_prints_no_kernel_warning():
    proc = subprocess.run([sys.executable, "-c", "import ftcore, bitsandbytes"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "gemm_4bit_forward" not in proc.stdout + proc.stderr, proc.stderr
