"""`evaluate` modules shipped with rana_hf (load them with `evaluate.load(path)`; see `rana_hf.evaluation`)."""
