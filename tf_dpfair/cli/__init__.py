"""Console commands installed with the package (see setup.cfg's entry points).

Each module has a thin `main` that parses the command line and calls a
testable function of the same module. `tf_startup` is what every command
that imports TensorFlow runs first: it hides TensorFlow's C++ start-up logs
(`TF_DPFAIR_TF_LOGS=1` shows them). `tf-dpfair-privacy` imports no
TensorFlow.
"""
