"""The performance benchmark of tdbot; run it with `python bench/run.py [--quick]`."""
