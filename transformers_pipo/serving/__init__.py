"""Serving PIPO checkpoints with inference engines (outside the remote-code modules).

Nothing here is imported by ``import transformers_pipo``; engine integrations import their engine lazily.
"""
