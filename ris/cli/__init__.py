"""Thin command-line front ends over the importable API (one module per command)."""
