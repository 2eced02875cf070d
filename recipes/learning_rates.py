"""The learning rate recipes/multi30k.py uses for each ``--optimizer`` when ``--learning_rate`` is not given.

A result of the Multi30K convergence benchmark (benchmarks/convergence.py), so it lives with the recipe,
not in the library. Muon: AdamW's (its default lr adjustment matches AdamW's update RMS, fngd_hf/muon.py).
FNGD, NGD, CW-NGD, K-FAC, SGD and Shampoo: the best of the CPU convergence benchmark at their default
settings (README, Convergence; Shampoo's statistics are sums, so it needs a large rate: 1e-3 and below did
not train). AdamW keeps the usual Transformer 5e-4: its benchmark best, 2e-3, was measured with warmup and
sits next to a collapse at 3e-3. SNGD's best (3e-2) was measured with trust_ratio=0.1, which is not its default.

recipes/ is not a package: the recipe (run as a script) finds this file next to itself; benchmarks put
recipes/ on ``sys.path``.
"""

DEFAULT_LEARNING_RATES = {
    "fngd": 1e-2, "ngd": 1e-2, "cwngd": 1e-2, "kfac": 3e-2, "sngd": 1e-1, "shampoo": 1e-1, "muon": 5e-4, "adamw": 5e-4,
    "sgd": 3e-1,
}
