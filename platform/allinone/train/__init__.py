"""One curriculum stage on Ray Train workers: the typed stage job, the DeepSpeed engine, the worker
loop and the training objective."""
