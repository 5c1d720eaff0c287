"""Attention-side methods that wrap any cache (Self-Extend)."""
