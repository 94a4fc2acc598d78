"""Console commands installed with the package (see setup.cfg's entry points).

Each module has a thin `main` that parses the command line and calls a
testable function of the same module.
"""
