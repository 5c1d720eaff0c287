"""Eviction methods: one file each (streaming, snapkv, pyramidkv, tova, knorm, adakv); shared machinery
in `base.py` (budgets, top-k, compaction, decode) and `paged.py` (ragged per-head pages)."""
