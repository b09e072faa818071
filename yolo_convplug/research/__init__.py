"""Research tools, one concern a module:

- :mod:`.variants`: which models an ablation compares (the shipped YAMLs) and how short names resolve;
- :mod:`.data`: the dataset a run uses and the synthetic ``shapes`` set;
- :mod:`.measure`: latency and GFLOPs, shared by the bench and the ablation;
- :mod:`.report`: the ablation's table, notes and plot;
- :mod:`.ablate`: the ablation driver (``main`` is ``scripts/ablate.py``), built from :mod:`.plan` (settings, jobs,
  reuse), :mod:`.run` (one run), :mod:`.execute` (many runs) and :mod:`.progress` (the console);
- :mod:`.conversion`: how well a stock checkpoint converts into a plug-in model (warm start);
- :mod:`.bench`: every registered module against the stock layer (``main`` is ``scripts/bench_modules.py``);
- :mod:`.workflow`: train and validate with offline-safe defaults (``scripts/train.py``, ``scripts/val.py``).
"""
