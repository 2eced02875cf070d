"""benchmarks/convergence_table.py: merging run folders, best run per method, disturbed clocks marked."""

import json
import sys

from multi30k_fixtures import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import convergence  # noqa: E402
import convergence_table  # noqa: E402


def run(method, lr, bleus, variant="", seconds=10.0, **extra):
    epochs = [{"epoch": i + 1, "val_loss": 5.0 - i, "val_bleu": b, "train_seconds": seconds * (i + 1),
               "source_gap": 1.0} for i, b in enumerate(bleus)]
    return {"method": method, "lr": lr, "variant": variant, "returncode": 0, "epochs": epochs, **extra}


def write(folder, runs, machine="box"):
    folder.mkdir(parents=True)
    (folder / "curves.json").write_text(json.dumps({"setting": "cpu", "machine": machine, "recipe_flags": [],
                                                     "runs": runs}))


def test_merge_replaces_same_label_and_keeps_the_rest(tmp_path):
    write(tmp_path / "a", [run("adamw", 1e-3, [1, 2]), run("fngd", 1e-2, [3, 4])])
    write(tmp_path / "b", [run("fngd", 1e-2, [5, 9]), run("fngd", 1e-2, [1, 1], variant="refreshed")], machine="other")
    merged = convergence_table.merge(tmp_path / "out", [tmp_path / "a", tmp_path / "b"])
    labels = sorted(convergence.run_label(r) for r in merged["runs"])
    assert labels == ["adamw lr=0.001", "fngd lr=0.01", "fngd lr=0.01 refreshed"]
    fngd = next(r for r in merged["runs"] if convergence.run_label(r) == "fngd lr=0.01")
    assert fngd["epochs"][-1]["val_bleu"] == 9  # the later folder wins
    assert merged["machine"] == "box; other"
    assert json.loads((tmp_path / "out" / "curves.json").read_text()) == merged


def test_best_per_method_ignores_variants_and_failed_runs():
    runs = [run("fngd", 1e-2, [1, 5]), run("fngd", 3e-2, [1, 7]), run("fngd", 1e-2, [1, 30], variant="paper"),
            {"method": "adamw", "lr": 1e-3, "variant": "", "returncode": 1}, run("adamw", 2e-3, [2, 3])]
    best = {r["method"]: r["lr"] for r in convergence.best_per_method(runs)}
    assert best == {"fngd": 3e-2, "adamw": 2e-3}


def test_table_marks_disturbed_clocks_and_failures():
    text = convergence_table.table([run("fngd", 1e-2, [1, 5], seconds_disturbed=True), run("adamw", 1e-3, [1, 2]),
                                    {"method": "sgd", "lr": 0.1, "variant": "", "returncode": 2}])
    fngd, adamw, sgd = text.splitlines()[2:]
    assert "| 20* |" in fngd and "(ep 2)" in fngd
    assert "| 20 |" in adamw and "(ep 2, 20 s)" in adamw
    assert "failed (exit 2)" in sgd
