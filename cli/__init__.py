"""sparse_frontier.cli

Importing this package (the ``frontier`` command does, before anything loads numpy) applies
:func:`prefer_avx2_sort` to the process and the workers it starts.
"""

import os
import re
import sys
from importlib import metadata

# numpy's names (2.4 and newer) for its AVX-512 code paths
_AVX512_FEATURES = "X86_V4 AVX512_ICL AVX512_SPR"


def zen4_with_avx512(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` text describes an AMD Zen 4 CPU (family 25) that has AVX-512."""
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo, re.M)
    family = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    return (vendor is not None and vendor.group(1) == "AuthenticAMD" and family is not None
            and int(family.group(1)) == 25 and flags is not None and "avx512f" in flags.group(1).split())


def prefer_avx2_sort(environ=os.environ, cpuinfo: str | None = None, numpy_version: str | None = None) -> bool:
    """On AMD Zen 4, have numpy use its AVX2 sort instead of its AVX-512 one; whether it did.

    The simulator ranks keys with ``np.sort`` / ``np.argsort``. numpy's AVX-512 sort stores through the
    compress instruction, which Zen 4 runs in microcode: there it sorts 3-4x slower than numpy's AVX2 sort
    (same results; benchmarks/RESULTS.md). numpy reads ``NPY_DISABLE_CPU_FEATURES`` when it loads, so this
    only acts before that, with numpy 2.4 or newer (whose feature names these are), and never over a value
    already set (set it, even empty, to choose yourself).
    """
    if "NPY_DISABLE_CPU_FEATURES" in environ or "numpy" in sys.modules:
        return False
    try:
        version = numpy_version or metadata.version("numpy")
        if cpuinfo is None:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
    except (OSError, metadata.PackageNotFoundError):
        return False
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    if (major, minor) < (2, 4) or not zen4_with_avx512(cpuinfo):
        return False
    environ["NPY_DISABLE_CPU_FEATURES"] = _AVX512_FEATURES
    return True


prefer_avx2_sort()
