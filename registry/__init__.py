"""The model registry side: the MLflow store and run lifecycle, the champion rule, the model
card and importing the champion into the BentoML store (`cifar-import-champion`)."""
