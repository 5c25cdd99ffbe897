"""Headless trainer (`python -m dstrain`); see __main__.py."""
