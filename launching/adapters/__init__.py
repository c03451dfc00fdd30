"""Every use of a private API of submitit, Hydra or Optuna, one module per library.

Each function names the public gap it fills; tests/test_adapters.py fails when the library
changes what the function relies on, so an upgrade breaks one test here rather than a launch.
"""
