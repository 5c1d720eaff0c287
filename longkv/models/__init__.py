"""Models: the registry of known names, fetching and caching their weights, the tokenizer wrapper, and
the forward passes. Importing this package loads nothing heavy; each module imports torch or
transformers itself when it needs them."""
