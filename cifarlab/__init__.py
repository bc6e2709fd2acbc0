"""Core library of the CIFAR-10 pipeline: data, splits, training, evaluation.

Plain Python and torch only: no Prefect, MLflow or BentoML imports here, so the flows, the tests
and the command line call the same code. Importing the package itself imports nothing heavy.
"""
