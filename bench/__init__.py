"""Microbenchmarks of topn_kernels (``make bench`` / ``python -m bench``)."""

import os


def _separate_inductor_cache() -> None:
    """With ATEN_CPU_CAPABILITY set, torch.compile's kernels go to a cache of their own: the
    inductor cache is not keyed by it, and a kernel compiled for another capability was seen
    to crash (AVX-512 kernels loaded under avx2). Runs before anything imports topn_kernels,
    whose import (through torch._dynamo) fixes TORCHINDUCTOR_CACHE_DIR to the default."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}_{capability}"


_separate_inductor_cache()
