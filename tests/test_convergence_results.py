"""The results file of benchmarks/convergence.py (--results, --import-curves) and its table and plot."""

import json
import sys

import pytest

from multi30k_fixtures import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import convergence  # noqa: E402
import convergence_table  # noqa: E402

OLD_COMMAND = (
    "/work/main/recipes/multi30k.py --output_dir /tmp/full_fngd/runs/fngd-lr1e-2 --optimizer fngd --learning_rate 1e-2 "
    "--per_device_train_batch_size 64 --seed 0 --data_dir ../shared/data/multi30k --max_train_samples 29000"
)
BEAM4 = {"settings": {"split": "test_2016_flickr", "sentences": 1000, "num_beams": 4, "max_length": 128},
         "bleu": 30.2, "chrf": 55.0}


def curves_run(method="fngd", lr=1e-2, command=OLD_COMMAND, losses=(3.0, 2.5), **extra):
    epochs = [{"epoch": i + 1, "val_loss": v, "val_bleu": 10.0 * (i + 1), "train_seconds": 100.0 * (i + 1)}
              for i, v in enumerate(losses)]
    return {"method": method, "lr": lr, "variant": "", "command": command, "returncode": 0, "epochs": epochs, **extra}


def result(method="fngd", lr=1e-2, seed=0, bleu=30.0, loss=2.0, adamw_lr=1e-2, variant="", seconds=100.0):
    return {"method": method, "lr": lr, "adamw_lr": adamw_lr, "variant": variant, "seed": seed, "shipped_default": False,
            "test2016_bleu_beam4": bleu, "val_loss": [3.0, loss], "val_bleu": [10.0, 20.0],
            "train_seconds": [seconds / 2, seconds], "command": "python recipes/multi30k.py"}


def test_muon_is_a_method_with_adamws_schedule():
    assert convergence.METHOD_FLAGS["muon"] == convergence.METHOD_FLAGS["adamw"]
    assert convergence.parse_methods("muon:2e-3") == [("muon", "2e-3", "", "")]


def test_methods_take_an_adamw_part_rate_and_seeds_a_list():
    assert convergence.parse_methods("fngd:1e-2/2e-3:refreshed,adamw:1e-3") == [
        ("fngd", "1e-2", "2e-3", "refreshed"), ("adamw", "1e-3", "", "")]
    for bad in ("adamw:1e-3/1e-3", "fngd:1e-2/x", "fngd:-1", "fngd:1e-2:nope", "nope:1e-2", "fngd"):
        with pytest.raises(ValueError):
            convergence.parse_methods(bad)
    assert convergence.parse_seeds("0,1,2") == [0, 1, 2] and convergence.parse_seeds("3") == [3]
    assert convergence.run_name("fngd", "1e-2", "2e-3", "refreshed", 2) == "fngd-lr1e-2-alr2e-3-refreshed-seed2"
    assert convergence.run_name("fngd", "1e-2") == "fngd-lr1e-2"  # the earlier layout


def test_labels_tell_seeds_and_adamw_rates_apart_and_keep_old_labels():
    old = {"method": "fngd", "lr": 0.01, "variant": ""}
    assert convergence.run_label(old) == "fngd lr=0.01"
    assert convergence.run_label({**old, "seed": 0, "adamw_lr": None}) == "fngd lr=0.01"
    labels = {convergence.run_label({**old, "seed": s, "adamw_lr": a}) for s in (0, 1) for a in (None, 2e-3)}
    assert len(labels) == 4


def test_command_keeps_only_repo_relative_paths():
    # A path beside the repo becomes relative; one under another top folder keeps only its name.
    elsewhere = "/elsewhere-than-the-repo/tok"
    text = convergence.relative_command(OLD_COMMAND + f" --tokenizer_name {elsewhere} --cache {REPO.parent}/shared/x")
    assert text.startswith("python recipes/multi30k.py --output_dir OUT/fngd-lr1e-2 ")
    assert "--data_dir ../shared/data/multi30k" in text and "--cache ../shared/x" in text
    assert "--tokenizer_name '<tok>'" in text
    assert str(REPO.parent) not in text and "/elsewhere" not in text and "/work" not in text
    live = f"/usr/bin/python3 {REPO}/recipes/multi30k.py --output_dir {REPO}/docs/x/runs/muon-lr2e-3-seed1 --seed 1"
    assert convergence.relative_command(live) == "python recipes/multi30k.py --output_dir OUT/muon-lr2e-3-seed1 --seed 1"


def test_the_adamw_part_rate_the_recipe_reports_is_read(tmp_path):
    path = tmp_path / "results.json"
    assert convergence.reported_adamw_lr(path) is None
    settings = {"optimizer": "fngd", "learning rate": "0.01 peak, linear schedule, 0 warmup steps",
                "AdamW part (embeddings, LayerNorms)": "lr 0.002, betas 0.9/0.999, eps 1e-08"}
    path.write_text(json.dumps({"optimizer_settings": settings}))
    assert convergence.reported_adamw_lr(path) == 0.002
    path.write_text(json.dumps({"optimizer_settings": {"optimizer": "adamw", "learning rate": "0.002 peak"}}))
    assert convergence.reported_adamw_lr(path) is None
    # What the run reported wins over the command and the defaults.
    record = curves_run(command=OLD_COMMAND + " --fngd_adamw_lr 3e-3", seed=0, adamw_lr_used=0.002)
    assert convergence.used_adamw_lr(record) == 0.002
    assert convergence.used_adamw_lr({**record, "adamw_lr_used": None}) == 3e-3


def test_historical_record_and_shipped_default(monkeypatch):
    record = curves_run(test_beam=BEAM4)
    converted = convergence.results_record(record, historical=True)
    assert list(converted) == list(convergence.RESULT_FIELDS)
    assert (converted["seed"], converted["adamw_lr"], converted["test2016_bleu_beam4"]) == (0, 1e-2, 30.2)
    assert converted["val_loss"] == [3.0, 2.5] and converted["train_seconds"] == [100.0, 200.0]
    # Shipped default: the recipe's lr for the method, its AdamW-part rate, no variant.
    monkeypatch.setitem(convergence.DEFAULT_LEARNING_RATES, "fngd", 1e-2)
    monkeypatch.setattr(convergence, "default_adamw_lr", lambda method, lr, step_length=None: 2e-3)
    assert not convergence.results_record(record, historical=True)["shipped_default"]  # AdamW part at 1e-2
    since = " ".join(convergence.FNGD_DEFAULTS_SINCE_RECORDED)
    assert since == "--fngd_normalize_directions True --fngd_damping 10"
    explicit = curves_run(command=f"{OLD_COMMAND} --fngd_adamw_lr 2e-3 {since}", seed=0, adamw_lr=2e-3)
    assert convergence.results_record(explicit)["shipped_default"]
    # Recorded before normalize_directions (or damping 10) became the default: its command lacks it, it ran without.
    assert not convergence.results_record({**explicit, "command": OLD_COMMAND + " --fngd_adamw_lr 2e-3"})["shipped_default"]
    before_damping = OLD_COMMAND + " --fngd_adamw_lr 2e-3 --fngd_normalize_directions True"
    assert not convergence.results_record({**explicit, "command": before_damping})["shipped_default"]
    assert not convergence.results_record({**explicit, "command": explicit["command"] + " --fngd_normalize_directions False"})["shipped_default"]
    assert not convergence.results_record({**explicit, "variant": "refreshed"})["shipped_default"]
    assert not convergence.results_record({**explicit, "lr": 5e-3})["shipped_default"]
    # A variant whose flags the defaults now set (Muon's step length, the recipe's schedule) is the default.
    monkeypatch.setitem(convergence.DEFAULT_LEARNING_RATES, "fngd", 4e-3)
    monkeypatch.setattr(convergence, "default_adamw_lr", lambda method, lr, step_length=None: 4e-3)
    muon_step = curves_run(command=f"{OLD_COMMAND} --fngd_adamw_lr 4e-3 {since}", seed=0, adamw_lr=4e-3)
    assert convergence.results_record({**muon_step, "lr": 4e-3, "variant": "muon_step"})["shipped_default"]
    assert convergence.results_record({**muon_step, "lr": 4e-3, "variant": "unit"})["shipped_default"]
    assert not convergence.results_record({**muon_step, "lr": 4e-3, "variant": "raw"})["shipped_default"]
    assert not convergence.results_record({**muon_step, "lr": 4e-3, "variant": "graft"})["shipped_default"]
    assert convergence.results_record({**muon_step, "lr": 4e-3, "variant": "unit+damping10"})["shipped_default"]
    assert not convergence.results_record({**muon_step, "lr": 4e-3, "variant": "damping0.1"})["shipped_default"]
    assert not convergence.redundant_variant("fngd", "uniform") and convergence.redundant_variant("fngd", "muon_step")
    # Greedy, or beam 4 on part of the test set: not the beam-4 test BLEU.
    partial = {**BEAM4, "settings": {**BEAM4["settings"], "sentences": 500}}
    assert convergence.results_record(curves_run(test_beam=partial))["test2016_bleu_beam4"] is None
    # A diverged run's NaN is not JSON: null.
    assert convergence.results_record(curves_run(losses=(3.0, float("nan"))))["val_loss"] == [3.0, None]


def test_results_file_replaces_the_same_run_and_keeps_seeds_apart(tmp_path):
    path = tmp_path / "results" / "r.json"
    convergence.update_results(path, [result(seed=0, bleu=1.0), result(seed=1, bleu=2.0)])
    convergence.update_results(path, [result(seed=0, bleu=3.0), result(adamw_lr=2e-3, bleu=4.0)])
    runs = json.loads(path.read_text())["runs"]
    assert sorted((r["seed"], r["adamw_lr"], r["test2016_bleu_beam4"]) for r in runs) == [
        (0, 0.002, 4.0), (0, 0.01, 3.0), (1, 0.01, 2.0)]
    assert all(list(r) == list(convergence.RESULT_FIELDS) for r in runs)


def test_a_run_under_todays_defaults_does_not_replace_an_old_run_of_the_same_name(tmp_path):
    # Before the key held the defaults, an NGD run at gamma 10 replaced the gamma 0.1 record of the same rates.
    path = tmp_path / "r.json"
    today = "python recipes/multi30k.py " + " ".join(convergence.FNGD_DEFAULTS_SINCE_RECORDED)
    convergence.update_results(path, [result(bleu=1.0)])
    convergence.update_results(path, [{**result(bleu=2.0), "command": today}])
    convergence.update_results(path, [{**result(bleu=3.0), "command": today}])  # the same setting: replaced
    runs = json.loads(path.read_text())["runs"]
    assert sorted(r["test2016_bleu_beam4"] for r in runs) == [1.0, 3.0]
    rows = convergence_table.results_table(runs).splitlines()[2:]
    assert len(rows) == 2 and "| - |" in rows[0] and "| - (earlier defaults) |" in rows[1]
    assert [g["key"][-1] for g in convergence_table.pooled(runs)] == [True, False]
    # A variant that overrides a default after it (the uniform control's damping) was still recorded today.
    overridden = today + " --fngd_damping 1e6"
    assert convergence.setting_key({**result(), "command": overridden})[-1] is True
    assert not convergence.ran_with_current_defaults("fngd", overridden)  # nor is it the shipped default
    # Methods outside the FNGD family have no such defaults: their "-" is always today's.
    assert convergence.setting_key(result("adamw"))[-1] is True


def test_import_curves_writes_records_without_training(tmp_path, monkeypatch):
    folder = tmp_path / "curves"
    folder.mkdir()
    runs = [curves_run(test_beam=BEAM4), curves_run("adamw", 2e-3, OLD_COMMAND.replace("fngd", "adamw"))]
    (folder / "curves.json").write_text(json.dumps({"runs": runs}))
    target = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["convergence.py", "--results", str(target), "--import-curves", str(folder)])
    monkeypatch.setattr(convergence, "run_method", lambda *a, **k: pytest.fail("--import-curves must not train"))
    convergence.main()
    records = json.loads(target.read_text())["runs"]
    assert [(r["method"], r["adamw_lr"], r["test2016_bleu_beam4"]) for r in records] == [
        ("fngd", 0.01, 30.2), ("adamw", None, None)]


def test_beam4_scoring_of_a_finished_run_fills_the_record(tmp_path, monkeypatch):
    import rescore

    run_dir = tmp_path / "runs" / "muon-lr2e-3"
    run_dir.mkdir(parents=True)
    (run_dir / "model.safetensors").write_bytes(b"")
    references = [f"ein großer Hund läuft heute draußen {i}" for i in range(1000)]
    monkeypatch.setattr(rescore, "split_sentences", lambda *a: ([f"a dog {i}" for i in range(1000)], references))
    monkeypatch.setattr(rescore, "load_translator", lambda folder: (None, None))
    monkeypatch.setattr(rescore, "translate", lambda model, tok, sources, **kw: references)
    record = curves_run("muon", 2e-3, f"recipes/multi30k.py --output_dir {run_dir} --seed 1", seed=1, adamw_lr=None)

    class Args:
        data_dir = None

    convergence.score_beam4(record, Args)
    assert record["test_beam"]["settings"]["num_beams"] == 4
    assert convergence.results_record(record)["test2016_bleu_beam4"] == pytest.approx(100.0)


def test_table_pools_seeds_with_mean_and_spread_and_plots(tmp_path):
    runs = [result(seed=0, bleu=30.0, loss=2.0), result(seed=1, bleu=32.0, loss=2.2),
            result("adamw", 2e-3, adamw_lr=None, bleu=33.8), {**result("sgd", 0.1, adamw_lr=None, bleu=None),
                                                              "val_loss": [], "val_bleu": [], "train_seconds": []}]
    text = convergence_table.results_table(runs)
    adamw, sgd, fngd = text.splitlines()[2:]  # convergence_table.METHOD_ORDER
    assert "| 0, 1 (2) |" in fngd and "| 31.0 ± 1.4 |" in fngd and "| 2.100 ± 0.141 |" in fngd
    assert "| 33.8 |" in adamw and "| - |" in adamw
    assert "1 failed" in sgd
    png = tmp_path / "curves.png"
    convergence_table.plot_results(runs, png, "test")
    assert png.stat().st_size > 10_000


def test_plot_draws_only_the_settings_named_and_refuses_an_unknown_label(tmp_path, monkeypatch):
    runs = [result(seed=0), result(seed=1), result("adamw", 2e-3, adamw_lr=None, bleu=33.8)]
    drawn = []
    import matplotlib.axes

    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: drawn.append(k["label"]) or original(self, *a, **k))
    convergence_table.plot_results(runs, tmp_path / "only.png", "test", only=["adamw lr=0.002"])
    assert set(drawn) == {"adamw lr=0.002"} and len(drawn) == 4  # one curve on each of the four axes
    with pytest.raises(ValueError, match="adamw lr=0.003"):
        convergence_table.plot_results(runs, tmp_path / "none.png", "test", only=["adamw lr=0.003"])


def test_committed_results_file_is_well_formed():
    runs = json.loads((REPO / "docs" / "results" / "full_multi30k.json").read_text())["runs"]
    assert all(list(r) == list(convergence.RESULT_FIELDS) for r in runs)
    assert all("/work" not in r["command"] and "/tmp" not in r["command"] for r in runs)
    assert len({convergence.result_key(r) for r in runs}) == len(runs)
    # The full-data runs of docs/convergence_cpu_full, with docs/convergence.md's beam-4 test BLEU (AdamW's seed 0
    # was rerun side by side with FNGD's for timing: 33.0, where the first run had scored 33.8).
    earlier = {(r["method"], r["lr"]): round(r["test2016_bleu_beam4"], 1) for r in runs
               if r["seed"] == 0 and not r["variant"]}
    assert {k: earlier.get(k) for k in [("adamw", 2e-3), ("fngd", 1e-2), ("fngd", 5e-3), ("ngd", 1e-2)]} == {
        ("adamw", 2e-3): 33.0, ("fngd", 1e-2): 30.2, ("fngd", 5e-3): 31.5, ("ngd", 1e-2): 29.7}


def test_robustness_reruns_records_from_before_todays_defaults_and_tables_them():
    import robustness

    assert robustness.parse_methods("adamw,fngd:2e-3") == [("adamw", repr(convergence.DEFAULT_LEARNING_RATES["adamw"])),
                                                           ("fngd", "2e-3")]
    with pytest.raises(ValueError, match="unknown method"):
        robustness.parse_methods("lion")
    with pytest.raises(ValueError, match="no method"):
        robustness.parse_methods(" , ")
    cell = "batch 8"
    today = " ".join(["python recipes/multi30k.py --optimizer fngd", *convergence.FNGD_DEFAULTS_SINCE_RECORDED])
    rate = convergence.DEFAULT_LEARNING_RATES["fngd"]
    old = {"cell": cell, "method": "fngd", "lr": rate, "val_loss": 2.92, "val_bleu": 22.5, "source_gap": 3.0,
           "command": "python recipes/multi30k.py --optimizer fngd"}
    new = {**old, "val_loss": 2.89, "val_bleu": 23.3, "command": today}
    adamw = {**old, "method": "adamw", "lr": 5e-4, "val_loss": 3.9, "val_bleu": 8.8, "command": "python x --optimizer adamw"}
    assert not robustness.done([old, adamw], cell, "fngd", repr(rate))  # ran without today's defaults: run again
    assert robustness.done([new, adamw], cell, "fngd", repr(rate)) and robustness.done([adamw], cell, "adamw", "0.0005")
    assert not robustness.done([new], cell, "fngd", "2e-3")  # another rate is another run
    text = robustness.table([adamw, old, {**new, "lr": 0.01, "val_loss": None, "returncode": 1}])
    lines = text.splitlines()
    assert lines[0] == f"| cell | adamw 0.0005 (default) | fngd {rate:g} (default) | fngd 0.01 |"
    assert lines[2] == "| batch 8 | 3.90 / 8.8 / 3.00 | 2.92 / 22.5 / 3.00 (before today's defaults) | failed (rc 1) |"
