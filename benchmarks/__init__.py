"""The benchmark scripts (a package of the checkout, not installed with kvfactory).

Run one from the repository root as ``python -m benchmarks.<name>`` (no install needed), or as
``python benchmarks/<name>.py`` once kvfactory is installed (``pip install -e .``). None edits ``sys.path``.
"""
