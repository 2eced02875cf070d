"""Convergence benchmark: the Multi30K recipe with each optimizer, same model, data order and budget.

    python benchmarks/convergence.py --data-dir ../shared/data/multi30k --setting cpu --out docs/convergence_cpu
    python benchmarks/convergence.py --data-dir ../shared/data/multi30k --setting gpu --out docs/convergence_gpu

Every method runs ``recipes/multi30k.py`` in its own process with the same seed, data, model
and epochs; only ``--optimizer`` and its learning rate (and the method's own flags) differ.
Per epoch it records validation loss, validation loss with shuffled sources (the collapse
check), validation BLEU and the training wall clock (evaluation excluded); at the end, BLEU and
chrF on every test set. Writes ``curves.json`` and ``curves.png`` (loss and BLEU against epoch
and against seconds) into ``--out``, and prints a table. ``--methods adamw:1e-3,adamw:3e-3,fngd:1e-2,fngd:1e-2:refreshed+damping1``
picks methods, learning rates and variants (``VARIANT_FLAGS``, combined with ``+``); a small sweep is one method listed
with several rates. ``fngd:1e-2/2e-3`` also sets the rate of the AdamW part of a hybrid method (embeddings, LayerNorm,
output head: ``--fngd_adamw_lr``). ``--seed 0,1,2`` runs every method once per seed. Runs accumulate in ``curves.json``
across invocations (``--fresh`` starts over).

``--results docs/results/full_multi30k.json`` also scores each finished run's saved model on the whole test-2016
set with beam 4 (``benchmarks/rescore.py``) and writes one record per run into that file as soon as the run ends
(same method, rates, variant and seed: replaced), in the format of ``RESULT_FIELDS``; ``command`` there is the
recipe command with repo-relative paths (``OUT/<run>`` for the output folder). Runs recorded earlier in a
``curves.json`` folder land there with ``--import-curves FOLDER`` (no training)::

    python benchmarks/convergence.py --results docs/results/full_multi30k.json --import-curves docs/convergence_cpu_full
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "recipes" / "configs" / "fngd_paper.yaml"
sys.path.insert(0, str(REPO / "recipes"))  # recipes/ is not a package
sys.path.append(str(REPO))  # fngd_hf from this checkout when it is not installed (an installed one comes first)
from learning_rates import DEFAULT_LEARNING_RATES, FNGD_FAMILY  # noqa: E402  (the recipe's default learning rate per method)


def config_flags(path: Path) -> list[str]:
    """A recipe config file as recipe flags, without ``optimizer`` and ``learning_rate`` (the benchmark sets those)."""
    import yaml

    flags = []
    for key, value in yaml.safe_load(path.read_text(encoding="utf-8")).items():
        if key not in ("optimizer", "learning_rate"):
            flags += [f"--{key}", str(value)]
    return flags

# Recipe flags of each setting; both use the same data pipeline and evaluation.
SETTINGS = {
    # Finishes on 2 CPU cores in bounded time: a narrow model on a third of Multi30K.
    "cpu": ["--preset", "small", "--d_model", "128", "--ffn_dim", "512", "--attention_heads", "4",
            "--encoder_layers", "2", "--decoder_layers", "2", "--max_train_samples", "10000",
            "--max_eval_samples", "500", "--max_predict_samples", "500", "--num_train_epochs", "4",
            "--vocab_size", "6000", "--beam_size", "1", "--per_device_eval_batch_size", "128",
            "--test_splits", "test_2016_flickr"],
    # The paper's Transformer (d_model 512, FFN 2048, 8 heads, 6+6 layers) on full Multi30K.
    "gpu": ["--preset", "paper", "--num_train_epochs", "10", "--bf16", "--per_device_eval_batch_size", "256"],
}

# Method name -> recipe flags besides --optimizer and --learning_rate. Everything else is the
# recipe's default (max_grad_norm 1.0: the AdamW gradients, and for the layer-wise methods the
# applied update lr·d, are clipped at global norm 1).
WARMUP_THEN_LINEAR = ["--warmup_steps", "0.05", "--lr_scheduler_type", "linear"]
# What the FNGD family's defaults set that runs recorded before them did not (their commands lack it, and they
# ran without): spelled out in every command, a run counts as the shipped default only if its command has it.
# Both are Muon's step's defaults (a trust-region variant spells its own damping: its default is 0.1).
FNGD_DEFAULTS_SINCE_RECORDED = ["--fngd_normalize_directions", "True", "--fngd_damping", "10"]
METHOD_FLAGS = {
    "adamw": WARMUP_THEN_LINEAR,
    "sgd": [],
    # The recipe's schedule, spelled out: runs before the default became Muon's step length had no warmup
    # (their recorded commands lack these flags; add --warmup_steps 0 to repeat them).
    "fngd": WARMUP_THEN_LINEAR + FNGD_DEFAULTS_SINCE_RECORDED,
    "ngd": WARMUP_THEN_LINEAR + FNGD_DEFAULTS_SINCE_RECORDED,
    "cwngd": WARMUP_THEN_LINEAR + FNGD_DEFAULTS_SINCE_RECORDED,
    # K-FAC's own default damping (1e-3) diverged on a tiny BART; 0.1 is stable (tests/test_kfac.py).
    "kfac": ["--optim_args", "damping=0.1"],
    # SNGD whitens only the input side; it needs a per-layer trust region as FNGD does.
    "sngd": ["--optim_args", "trust_ratio=0.1"],
    "shampoo": [],
    # torch.optim.Muon on FNGD's layers' weights, AdamW on the rest (fngd_hf.muon.MuonHybrid); its learning rate is
    # AdamW-scale (adjust_lr_fn="match_rms_adamw"), so it gets AdamW's schedule.
    "muon": WARMUP_THEN_LINEAR,
}
# Methods with no separate AdamW part (their one optimizer covers every parameter).
NO_ADAMW_PART = ("adamw", "sgd")

# Ablations and variants: ``fngd:1e-2:refreshed`` adds these recipe flags to the method's own.
VARIANT_FLAGS = {
    "refreshed": ["--fngd_scale_mode", "refreshed"],  # rescale shared beta by tr(K_stored)/tr(K_new)
    "adamw_phase": ["--fngd_shared_phase", "adamw"],  # the first epoch's natural gradient, then AdamW
    "fixed": ["--fngd_damping_mode", "fixed", "--fngd_damping", "1e-3", "--fngd_trust_ratio", "none"],
    "no_trust": ["--fngd_trust_ratio", "none"],  # relative damping without the trust region
    "paper": config_flags(PAPER_CONFIG),  # the paper's setting, read from the recipe's named config
    "trust3": ["--fngd_trust_ratio", "3"],
    "trust0.3": ["--fngd_trust_ratio", "0.3"],
    "warmup": ["--warmup_steps", "0.05"],
    "nowarmup": ["--warmup_steps", "0"],
    "constant": ["--lr_scheduler_type", "constant"],  # the paper keeps the learning rate constant
    "damping0.1": ["--fngd_damping", "0.1"],
    "damping0.03": ["--fngd_damping", "0.03"],
    "damping1": ["--fngd_damping", "1.0"],
    # With Muon's step: towards the plain gradient, i.e. Muon (damping -> inf); the default since it won.
    "damping10": ["--fngd_damping", "10"],
    "by_sample": ["--fngd_share_by", "sample"],  # each sample keeps its first-epoch coefficient
    # Uniform coefficients: with damping 1e6·‖K‖ every β_n is the same, d ∝ the plain gradient, so this is SGD
    # with FNGD's trust region, momentum and AdamW part (the shared phase's "no curvature" limit). Confounded with
    # relative damping: β ≈ 1/(γ‖K‖_F) also shrinks the step about 1e6-fold, below the trust region's bound
    # (5.2 BLEU on full Multi30K measured that); Muon is the fair uniform control.
    "uniform": ["--fngd_damping", "1e6"],
    # FNGD's direction with AdamW's per-layer update length (grafting); lr is AdamW-scale, with AdamW's warmup.
    "graft": ["--fngd_step_length", "adamw", "--warmup_steps", "0.05", "--fngd_normalize_directions", "False"],
    # Muon's orthogonalised step along FNGD's direction (fngd_hf/orthogonal.py); lr AdamW-scale, Muon's schedule.
    "muon_step": ["--fngd_step_length", "muon", "--warmup_steps", "0.05", "--lr_scheduler_type", "linear"],
    "adamw_lr2e-3": ["--fngd_adamw_lr", "2e-3"],  # the AdamW part (embeddings, LayerNorm) at AdamW's best lr
    # Momentum, the one input besides the direction where FNGD's Muon step and Muon differ (0.9 heavy ball vs
    # 0.95 Nesterov): FNGD with Muon's 0.95 and with Nesterov; Muon with FNGD's 0.9 heavy ball.
    "momentum0.95": ["--fngd_momentum", "0.95"],
    "nesterov0.9": ["--fngd_nesterov", "True"],
    # Momentum over unit-norm layer directions (Muon's step discards their norm, which swings by 1e6 per epoch);
    # the default since it won; "raw" is the momentum of the raw directions, the default before.
    "unit": ["--fngd_normalize_directions", "True"],
    "raw": ["--fngd_normalize_directions", "False"],
    "heavy0.9": ["--optim_args", "momentum=0.9,nesterov=False"],
    # Twice the batch (half the steps): does the rate want to grow with the batch, as it shrinks below 64?
    "batch128": ["--per_device_train_batch_size", "128"],
    # The Monte-Carlo (true) Fisher instead of the empirical one: labels sampled from the model, one more backward
    # per step; NGD only (nothing to share). Does the Fisher of the model, not of the data, earn its cost?
    "mc_fisher": ["--fngd_fisher", "monte_carlo"],
}


def parse_methods(text: str) -> list[tuple[str, str, str, str]]:
    """``name:lr[/adamw_lr][:variant]`` items, comma separated -> ``(name, lr, adamw_lr or "", variant)``."""
    runs = []
    for item in text.split(","):
        name, _, rest = item.strip().partition(":")
        rates, _, variant = rest.partition(":")
        lr, _, adamw_lr = rates.partition("/")
        if name not in METHOD_FLAGS:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(METHOD_FLAGS)}")
        if not lr:
            raise ValueError(f"give a learning rate as {name}:LR")
        for rate in (lr, adamw_lr):
            if rate:
                try:
                    valid = float(rate) > 0.0
                except ValueError:
                    valid = False
                if not valid:
                    raise ValueError(f"{item!r}: {rate!r} is not a positive learning rate")
        if adamw_lr and name in NO_ADAMW_PART:
            raise ValueError(f"{item!r}: {name} has no separate AdamW part, so no /adamw_lr")
        unknown = [v for v in variant.split("+") if v and v not in VARIANT_FLAGS]
        if unknown:
            raise ValueError(f"unknown variant {unknown}; choose from {sorted(VARIANT_FLAGS)} (combine with +)")
        runs.append((name, lr, adamw_lr, variant))
    return runs


def parse_seeds(text: str) -> list[int]:
    """``"0"`` or ``"0,1,2"``."""
    try:
        seeds = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed takes integers separated by commas, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seed needs at least one seed")
    return seeds


def variant_flags(variant: str) -> list[str]:
    """Recipe flags of ``a+b`` variants, in order (a later flag wins in the recipe's parser)."""
    return [flag for part in variant.split("+") if part for flag in VARIANT_FLAGS[part]]


def run_label(record: dict) -> str:
    """Unique per method, rate(s), variant and seed (seed 0 and runs recorded without a seed: no suffix)."""
    label = f"{record['method']} lr={record['lr']:g}"
    if record.get("adamw_lr") is not None:
        label += f" adamw_lr={record['adamw_lr']:g}"
    if record.get("variant"):
        label += f" {record['variant']}"
    if record.get("seed"):
        label += f" seed={record['seed']}"
    return label


def run_name(name: str, lr: str, adamw_lr: str = "", variant: str = "", seed: int = 0) -> str:
    """The run's folder under ``--out/runs`` (the earlier layout when there is no adamw_lr and seed 0)."""
    return (f"{name}-lr{lr}" + (f"-alr{adamw_lr}" if adamw_lr else "") + (f"-{variant}" if variant else "")
            + (f"-seed{seed}" if seed else ""))


def run_method(name: str, lr: str, args, out: Path, variant: str = "", adamw_lr: str = "", seed: int | None = None) -> dict:
    seed = args.seed[0] if seed is None else seed
    run_dir = out / "runs" / run_name(name, lr, adamw_lr, variant, seed)
    command = [
        sys.executable, str(REPO / "recipes" / "multi30k.py"),
        "--output_dir", str(run_dir),
        "--optimizer", name, "--learning_rate", lr,
        *(["--fngd_adamw_lr", adamw_lr] if adamw_lr else []),
        "--per_device_train_batch_size", str(args.batch_size), "--seed", str(seed),
        "--eval_strategy", "epoch", "--save_strategy", "no", "--logging_steps", "50",
        "--report_to", "none", "--source_check", "True", "--disable_tqdm", "True",
        *(["--data_dir", str(args.data_dir)] if args.data_dir else []),
        *SETTINGS[args.setting], *METHOD_FLAGS[name], *variant_flags(variant), *args.extra,
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    record = {"method": name, "lr": float(lr), "adamw_lr": float(adamw_lr) if adamw_lr else None, "variant": variant,
              "seed": seed, "command": " ".join(command[1:]), "returncode": code,
              "process_seconds": time.perf_counter() - start}
    state_file, results_file = run_dir / "trainer_state.json", run_dir / "results.json"
    if code != 0:
        record["error"] = (run_dir / "log.txt").read_text()[-2000:]
    if not state_file.exists():
        return record
    # A run the recipe failed after training (e.g. its source check found a collapse) still has its curves.
    history = json.loads(state_file.read_text())["log_history"]
    evals = [r for r in history if "eval_loss" in r]
    checks = {r["epoch"]: r for r in history if "eval_source_gap" in r}
    record["epochs"] = [
        {
            "epoch": r["epoch"], "train_seconds": r.get("train_seconds"), "val_loss": r["eval_loss"],
            "val_bleu": r.get("eval_bleu"), "val_shuffled_source_loss": checks.get(r["epoch"], {}).get("eval_shuffled_source_loss"),
            "source_gap": checks.get(r["epoch"], {}).get("eval_source_gap"),
        }
        for r in evals
    ]
    record["skipped_steps"] = max((r.get("fngd/skipped_steps", 0) for r in history), default=0)
    used = reported_adamw_lr(results_file)
    if used is not None:
        record["adamw_lr_used"] = used
    if results_file.exists():
        results = json.loads(results_file.read_text())
        record["test"] = {split: {"bleu": v["bleu"], "chrf": v["chrf"]} for split, v in results.get("test", {}).items()}
        record["source_collapsed"] = results.get("validation", {}).get("eval_source_collapsed")
    return record


# ------------------------------------------------------------------------------------ results file
# One record per run in docs/results/*.json (issue 16's deliverable), in this order.
RESULT_FIELDS = ("method", "lr", "adamw_lr", "variant", "seed", "shipped_default", "test2016_bleu_beam4", "val_loss",
                 "val_bleu", "train_seconds", "command")
RESULTS_DESCRIPTION = (
    "One record per convergence run (benchmarks/convergence.py --results). lr: the method's learning rate; "
    "adamw_lr: the rate the AdamW part (embeddings, LayerNorm, output head) of a hybrid method used (null for adamw "
    "and sgd, which have none); variant: VARIANT_FLAGS names joined by +; shipped_default: lr is the recipe's "
    "default for the method (recipes/learning_rates.py), adamw_lr its default AdamW-part rate, no variant but those whose flags the defaults now set (muon_step: FNGD's default step length since it won); test2016_bleu_beam4: sacreBLEU on the "
    "1000 test-2016 Flickr sentences, beam 4 (null: not scored); val_loss, val_bleu (greedy), train_seconds: at the "
    "end of each epoch, train_seconds cumulative training wall clock without evaluation; command: the recipe command "
    "from the repo root, OUT standing for the output folder."
)
def reported_adamw_lr(results_file: Path) -> float | None:
    """The AdamW part's configured rate as the recipe reports it in results.json (``optimizer_settings``, a row
    "AdamW part ...": "lr 0.002, betas ..."); ``None`` when the file or the row is missing."""
    if not results_file.exists():
        return None
    settings = json.loads(results_file.read_text()).get("optimizer_settings") or {}
    for key, value in settings.items():
        match = re.search(r"\blr ([0-9][0-9.eE+-]*)", str(value)) if key.startswith("AdamW part") else None
        if match:
            return float(match.group(1))
    return None


def _words_value(words: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` (the recipe's parser lets a later flag win)."""
    values = [words[i + 1] for i, w in enumerate(words[:-1]) if w == flag]
    return values[-1] if values else None


def default_adamw_lr(method: str, lr: float, step_length: str | None = None) -> float | None:
    """The AdamW-part rate the trainer uses for ``method`` at ``lr`` when ``--fngd_adamw_lr`` is not given.

    Mirrors the trainer: ``FNGDTrainingArguments.fngd_adamw_lr``'s default, ``None`` meaning the optimizer's own
    (FNGD, NGD and CW-NGD: ``fngd_hf.settings.DEFAULT_RATES`` of their ``step_length``, ``None`` the default one;
    the other hybrids: ``learning_rate``).
    """
    if method in NO_ADAMW_PART:
        return None
    from fngd_hf import settings
    from fngd_hf.integrations.arguments import FNGDTrainingArguments

    default = FNGDTrainingArguments.__dataclass_fields__["fngd_adamw_lr"].default
    if default is not None:
        return float(default)
    if method in FNGD_FAMILY:
        return settings.default_rates(step_length or settings.DEFAULT_STEP_LENGTH)[1]
    return float(lr)


def used_adamw_lr(record: dict, historical: bool = False) -> float | None:
    """The AdamW-part rate a run used: as the recipe reported it, else the command's ``--fngd_adamw_lr``, else the
    default (``historical``: learning_rate, as before issue 16; otherwise the trainer's current default for the
    command's step length)."""
    if record["method"] in NO_ADAMW_PART:
        return None
    if record.get("adamw_lr_used") is not None:
        return float(record["adamw_lr_used"])
    words = shlex.split(record["command"])
    given = _words_value(words, "--fngd_adamw_lr")
    if given is not None:
        return float(given)
    if historical:
        return float(record["lr"])
    return default_adamw_lr(record["method"], record["lr"], _words_value(words, "--fngd_step_length"))


def _flag_pairs(flags: list[str]) -> list[tuple[str, str]]:
    return [(flags[i], flags[i + 1]) for i in range(0, len(flags) - 1, 2)]


def redundant_variant(method: str, variant: str) -> bool:
    """A variant whose every flag the method already runs with: ``METHOD_FLAGS`` or the trainer's default
    (``muon_step`` since Muon's step length became FNGD's default)."""
    if variant not in VARIANT_FLAGS or any(not flag.startswith("--") for flag in VARIANT_FLAGS[variant][::2]):
        return False
    from fngd_hf.integrations.arguments import ARG_DEFAULTS

    own = dict(_flag_pairs(METHOD_FLAGS.get(method, [])))
    for flag, value in _flag_pairs(VARIANT_FLAGS[variant]):
        name = flag[2:]
        if own.get(flag) != value and str(ARG_DEFAULTS.get(name, object())) != value:
            return False
    return True


def ran_with_current_defaults(method: str, command: str) -> bool:
    """False for an FNGD-family run recorded before ``FNGD_DEFAULTS_SINCE_RECORDED`` were the defaults (its command
    lacks them, and it ran without them)."""
    if method not in FNGD_FAMILY:
        return True
    words = shlex.split(command)
    return all(_words_value(words, flag) == value for flag, value in _flag_pairs(FNGD_DEFAULTS_SINCE_RECORDED))


def recorded_since_defaults(method: str, command: str) -> bool:
    """Whether an FNGD-family run was recorded since ``FNGD_DEFAULTS_SINCE_RECORDED``: its command holds them,
    last or not (a variant may override one after them, as the uniform control does the damping)."""
    if method not in FNGD_FAMILY:
        return True
    words = shlex.split(command)
    given = set(zip(words, words[1:]))
    return all(pair in given for pair in _flag_pairs(FNGD_DEFAULTS_SINCE_RECORDED))


def is_shipped_default(method: str, lr: float, adamw_lr: float | None, variant: str, command: str | None = None) -> bool:
    """No variant (or only variants the defaults already set), the recipe's default learning rate for the method
    and the trainer's default AdamW-part rate; with ``command``, an FNGD-family run must also have run with
    ``FNGD_DEFAULTS_SINCE_RECORDED`` (runs recorded before those defaults did not)."""
    if command is not None and not ran_with_current_defaults(method, command):
        return False
    default = DEFAULT_LEARNING_RATES.get(method)
    # A variant that only sets the AdamW-part rate is the default when that rate is the default one.
    variant = "+".join(v for v in variant.split("+") if v and not (v.startswith("adamw_lr") and adamw_lr is not None
                                                                   and adamw_lr == default_adamw_lr(method, lr))
                       and not redundant_variant(method, v))
    if variant or default is None or not math.isclose(lr, default, rel_tol=1e-9):
        return False
    expected = default_adamw_lr(method, lr)
    return adamw_lr == expected if expected is None or adamw_lr is None else math.isclose(adamw_lr, expected, rel_tol=1e-9)


def relative_command(command: str) -> str:
    """The recipe command from the repo root: the recipe as ``recipes/multi30k.py``, the output folder as
    ``OUT/<run>``, other absolute paths relative to the repo when they share its top folder, else ``<name>``."""
    words = shlex.split(command)
    if words and Path(words[0]).name.startswith("python") and not words[0].endswith(".py"):
        words = words[1:]  # the interpreter
    out = []
    for index, word in enumerate(words):
        if index > 0 and words[index - 1] == "--output_dir":
            out.append(f"OUT/{Path(word).name}")
        elif word.endswith("recipes/multi30k.py"):
            out.append("recipes/multi30k.py")
        elif os.path.isabs(word):
            parts = Path(word).parts
            out.append(os.path.relpath(word, REPO) if len(parts) > 1 and parts[1] == REPO.parts[1] else f"<{Path(word).name}>")
        else:
            out.append(word)
    return shlex.join(["python", *out])


def _finite(value):
    return value if value is None or math.isfinite(value) else None  # NaN/inf are not JSON


def beam4_bleu(record: dict) -> float | None:
    """Test-2016 BLEU with beam 4 on all 1000 sentences (``record["test_beam"]`` from rescore), else ``None``."""
    beam = record.get("test_beam") or {}
    settings = beam.get("settings", {})
    if settings.get("split") == "test_2016_flickr" and settings.get("num_beams") == 4 and settings.get("sentences") == 1000:
        return _finite(beam["bleu"])
    return None


def results_record(record: dict, historical: bool = False) -> dict:
    """A curves.json run as a results-file record (``RESULT_FIELDS``)."""
    words = shlex.split(record["command"])
    seed = record.get("seed")
    if seed is None:
        seed = int(_words_value(words, "--seed") or 0)
    adamw_lr = used_adamw_lr(record, historical)
    epochs = record.get("epochs", [])  # a failed run: empty curves, no test score
    lr = float(record["lr"])
    variant = record.get("variant") or ""
    return {
        "method": record["method"], "lr": lr, "adamw_lr": adamw_lr, "variant": variant, "seed": int(seed),
        "shipped_default": is_shipped_default(record["method"], lr, adamw_lr, variant, record["command"]),
        "test2016_bleu_beam4": beam4_bleu(record),
        "val_loss": [_finite(e["val_loss"]) for e in epochs],
        "val_bleu": [_finite(e.get("val_bleu")) for e in epochs],
        "train_seconds": [e.get("train_seconds") for e in epochs],
        "command": relative_command(record["command"]),
    }


def setting_key(result: dict) -> tuple:
    """Runs that differ only in their seed: method, rates, variant, and whether the run was recorded under today's
    FNGD defaults (a run under new defaults is a different setting from an old one of the same name, not its
    replacement)."""
    return (result["method"], result["lr"], result["adamw_lr"], result["variant"],
            recorded_since_defaults(result["method"], result["command"]))


def result_key(result: dict) -> tuple:
    return (*setting_key(result), result["seed"])


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def update_results(path: Path, new: list[dict]) -> list[dict]:
    """Write ``new`` into the results file: a record of the same setting (:func:`setting_key`) and seed is replaced."""
    keys = {result_key(r) for r in new}
    runs = [r for r in load_results(path) if result_key(r) not in keys] + [{k: r[k] for k in RESULT_FIELDS} for r in new]
    path.parent.mkdir(parents=True, exist_ok=True)
    # One record per line: readable, and a new run is a one-line diff.
    lines = ",\n".join("  " + json.dumps(r) for r in runs)
    path.write_text(f'{{\n "description": {json.dumps(RESULTS_DESCRIPTION)},\n "runs": [\n{lines}\n ]\n}}\n')
    return runs


def score_beam4(record: dict, args) -> None:
    """Beam-4 BLEU/chrF of the run's saved model on all of test-2016, into ``record["test_beam"]`` (as rescore.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import rescore

    folder = rescore.output_dir(record)
    if record.get("returncode") != 0 or not (folder / "model.safetensors").exists():
        return
    sources, references = rescore.split_sentences(args.data_dir, "test_2016_flickr", 1000)
    record["test_beam"] = rescore.beam_score(folder, sources, references, beams=4)


def best_per_method(records: list[dict]) -> list[dict]:
    """Each method's run (over learning rates; variants excluded) with the best final validation BLEU."""
    best: dict[str, dict] = {}
    for record in records:
        if "epochs" not in record or record.get("variant"):
            continue
        score = record["epochs"][-1].get("val_bleu") or 0.0
        kept = best.get(record["method"])
        if kept is None or score > (kept["epochs"][-1].get("val_bleu") or 0.0):
            best[record["method"]] = record
    return list(best.values())


def plot(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in records if "epochs" in r]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5 + 0.06 * len(shown)))
    colours = plt.get_cmap("tab20").colors
    for index, record in enumerate(shown):
        style = dict(color=colours[index % len(colours)], linestyle=("-", "--", ":")[index // len(colours) % 3])
        label = run_label(record)
        epochs = [e["epoch"] for e in record["epochs"]]
        seconds = [e["train_seconds"] for e in record["epochs"]]
        axes[0, 0].plot(epochs, [e["val_loss"] for e in record["epochs"]], marker="o", label=label, **style)
        axes[1, 0].plot(epochs, [e["val_bleu"] for e in record["epochs"]], marker="o", label=label, **style)
        if record.get("seconds_disturbed"):  # its wall clock shared the cores with other runs: no time axis
            continue
        axes[0, 1].plot(seconds, [e["val_loss"] for e in record["epochs"]], marker="o", label=label, **style)
        axes[1, 1].plot(seconds, [e["val_bleu"] for e in record["epochs"]], marker="o", label=label, **style)
    for ax, (ylabel, xlabel) in zip(axes.flat, [("val loss", "epoch"), ("val loss", "training seconds"),
                                                 ("val BLEU", "epoch"), ("val BLEU", "training seconds")]):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    losses = [e["val_loss"] for r in records for e in r.get("epochs", [])]
    if losses:  # a diverged run would squash every other curve: cut the axis at 8 nats
        for ax in axes[0]:
            ax.set_ylim(min(losses) - 0.2, min(max(losses), 8.0) + 0.2)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    columns = 3 if len(shown) > 8 else 4
    fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    rows = math.ceil(len(shown) / columns)
    fig.tight_layout(rect=(0, min(0.02 + 0.016 * rows, 0.5), 1, 1))
    fig.savefig(path, dpi=110)


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores ({cores} used, "
            f"{torch.get_num_threads()} torch threads), {gpu}, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="raw Multi30K files (default: the Hub dataset)")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument("--methods", default="adamw:1e-3,adamw:3e-3,fngd:1e-2,ngd:1e-2,kfac:1e-2,sgd:1e-1",
                        help="name:lr[/adamw_lr][:variant], comma separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=parse_seeds, default=[0], help="a seed, or seeds separated by commas")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "convergence")
    parser.add_argument("extra", nargs="*", help="more recipe flags for every run (after --)")
    parser.add_argument("--fresh", action="store_true", help="forget the runs already in --out/curves.json")
    parser.add_argument("--results", type=Path, default=None,
                        help="also score each run on test-2016 with beam 4 and write its record into this JSON file")
    parser.add_argument("--import-curves", type=Path, nargs="+", default=None, metavar="FOLDER",
                        help="with --results: write the runs of these curves.json folders into it, train nothing")
    args = parser.parse_args()
    if args.import_curves:
        if args.results is None:
            parser.error("--import-curves needs --results")
        for folder in args.import_curves:
            runs = json.loads((folder / "curves.json").read_text())["runs"]
            # Records without a seed come from before --results existed, when the AdamW part ran at learning_rate.
            update_results(args.results, [results_record(r, historical="seed" not in r) for r in runs])
            print(f"{folder}: {len(runs)} runs into {args.results}")
        return
    runs = parse_methods(args.methods)
    args.out.mkdir(parents=True, exist_ok=True)
    # Runs accumulate in curves.json across invocations (a sweep can be split); same label = replaced.
    previous = args.out / "curves.json"
    records = [] if args.fresh or not previous.exists() else json.loads(previous.read_text())["runs"]
    for seed in args.seed:
        for name, lr, adamw_lr, variant in runs:
            record = run_method(name, lr, args, args.out, variant, adamw_lr, seed)
            if args.results is not None:
                score_beam4(record, args)
            records = [r for r in records if run_label(r) != run_label(record)] + [record]
            last = record.get("epochs", [{}])[-1]
            print(f"{run_label(record):<28} val loss {last.get('val_loss', float('nan')):.3f}  val BLEU "
                  f"{last.get('val_bleu') or float('nan'):.2f}  source gap {last.get('source_gap') or float('nan'):.3f}  "
                  f"test {json.dumps(record.get('test', {}))}  beam 4 {record.get('test_beam', {}).get('bleu')}  "
                  f"{record.get('error', '')[-300:]}", flush=True)
            summary = {"setting": args.setting, "machine": machine(), "recipe_flags": SETTINGS[args.setting], "runs": records}
            (args.out / "curves.json").write_text(json.dumps(summary, indent=2) + "\n")
            if args.results is not None:  # recorded as each run ends: an interruption loses nothing
                update_results(args.results, [results_record(record)])
    plot(records, args.out / "curves.png", f"Multi30K en-de, setting '{args.setting}': {machine()}")


if __name__ == "__main__":
    main()
