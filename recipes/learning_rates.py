"""The learning rate recipes/multi30k.py uses for each ``--optimizer`` when ``--learning_rate`` is not given.

A result of the Multi30K convergence benchmark (benchmarks/convergence.py), so it lives with the recipe,
not in the library. FNGD, NGD and CW-NGD: the library's default for their step length
(``fngd_hf.settings.DEFAULT_RATES``: 6e-3 with the default Muon step, the best of full Multi30K; 1e-2 with
``--fngd_step_length trust_region``, the paper's step). Muon: AdamW's (its default lr adjustment matches AdamW's
update RMS, fngd_hf/muon.py). K-FAC, SGD and Shampoo: the best of the CPU convergence benchmark at their default
settings (Shampoo's statistics are sums, so it needs a large rate: 1e-3 and below did not train). AdamW keeps the
usual Transformer 5e-4: its benchmark best, 2e-3, sits next to a collapse at 4e-3. SNGD's best (3e-2) was
measured with trust_ratio=0.1, which is not its default.

recipes/ is not a package: the recipe (run as a script) finds this file next to itself; benchmarks put
recipes/ on ``sys.path``.
"""

from fngd_hf import settings
from fngd_hf.integrations.arguments import FNGD_FAMILY
_FNGD_DEFAULT = settings.DEFAULT_RATES[settings.DEFAULT_STEP_LENGTH][0]

DEFAULT_LEARNING_RATES = {
    "fngd": _FNGD_DEFAULT, "ngd": _FNGD_DEFAULT, "cwngd": _FNGD_DEFAULT, "kfac": 3e-2, "sngd": 1e-1, "shampoo": 1e-1,
    "muon": 5e-4, "adamw": 5e-4, "sgd": 3e-1,
}


def default_learning_rate(optimizer: str, step_length: str | None = None) -> float:
    """The rate for ``optimizer``; for the FNGD family, the one of its ``step_length`` (``None``: the default)."""
    if optimizer in FNGD_FAMILY and step_length is not None:
        return settings.default_rates(step_length, name="fngd_step_length")[0]
    return DEFAULT_LEARNING_RATES[optimizer]
