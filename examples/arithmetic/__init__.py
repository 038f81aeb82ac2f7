"""Miniature PIPO reproduction on integer arithmetic (see run_pipeline.py)."""
