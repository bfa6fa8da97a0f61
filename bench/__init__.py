"""Microbenchmarks of topn_kernels (``make bench`` / ``python -m bench``)."""
