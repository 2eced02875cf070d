"""A checkpoint the recipe publishes works for someone who never installs fngd_hf: the card's stock
snippet (AutoTokenizer + AutoModelForSeq2SeqLM.generate) and the custom pipeline shipped inside the
checkpoint (trust_remote_code), each run in a fresh Python that cannot import fngd_hf."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

import datasets
import pytest
from multi30k_fixtures import REPO

from fngd_hf.translation.model_card import write_model_card
from fngd_hf.translation.models import build_model
from fngd_hf.translation.pipeline import PIPELINE_FILE, save_translation_pipeline
from fngd_hf.translation.tokenization import train_tokenizer

MODEL_NAME = "me/m30k-tiny"  # the name the card's snippets use; the subprocess points it at the folder

# Runs in the fresh interpreter: any attempt to import fngd_hf fails, and at the end it must not be loaded.
FRESH_PYTHON = textwrap.dedent('''
    import io, json, sys, contextlib

    class NoFngdHf:
        def find_spec(self, name, path=None, target=None):
            if name == "fngd_hf" or name.startswith("fngd_hf."):
                raise ImportError("this interpreter must not import fngd_hf")

    sys.meta_path.insert(0, NoFngdHf())
    folder, snippets = sys.argv[1], json.loads(sys.argv[2])
    outputs = []
    for code in snippets:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code.replace(%(name)r, folder), {})
        outputs.append(printed.getvalue().strip())

    import transformers
    try:
        transformers.pipeline(model=folder)  # without trust_remote_code the shipped code must not run
        refused = ""
    except ValueError as error:
        refused = str(error)
    print(json.dumps({"outputs": outputs, "refused": refused, "fngd_hf_loaded": "fngd_hf" in sys.modules,
                      "pipeline_modules": sorted(m for m in sys.modules if m.endswith("translation_pipeline"))}))
''') % {"name": MODEL_NAME}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trained-from-nothing checkpoint saved the way the recipe saves its final model."""
    folder = tmp_path_factory.mktemp("checkpoint")
    pairs = {"en": ["A dog runs.", "Two men are outside.", "A child plays here."] * 20,
             "de": ["Ein Hund läuft.", "Zwei Männer sind draußen.", "Ein Kind spielt hier."] * 20}
    tokenizer = train_tokenizer(datasets.Dataset.from_dict(pairs), ["en", "de"], vocab_size=300)
    model = build_model(tokenizer, "tiny", max_length=12, num_beams=2, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_translation_pipeline(folder)
    write_model_card(folder, model_name=MODEL_NAME, source_lang="en", target_lang="de", results={},
                     optimizer_settings={"optimizer": "fngd"}, with_pipeline=True)
    return folder


def card_snippets(folder) -> list[str]:
    card = (folder / "README.md").read_text(encoding="utf-8")
    usage = card.split("## Usage\n")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", usage, flags=re.S)


def test_checkpoint_carries_its_pipeline(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["custom_pipelines"] == {"custom-translation": {
        "impl": "translation_pipeline.TranslationPipeline", "pt": ["AutoModelForSeq2SeqLM"], "type": "text"}}
    source = (checkpoint / PIPELINE_FILE).read_text(encoding="utf-8")
    imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", source, flags=re.M)
    assert imports and not [name for name in imports if name.split(".")[0] == "fngd_hf"]


def test_card_snippets_work_without_fngd_hf(checkpoint, tmp_path):
    snippets = card_snippets(checkpoint)
    assert len(snippets) == 2 and "AutoModelForSeq2SeqLM" in snippets[0] and "trust_remote_code=True" in snippets[1]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               HF_MODULES_CACHE=str(tmp_path / "modules"), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", FRESH_PYTHON, str(checkpoint), json.dumps(snippets)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["fngd_hf_loaded"] is False
    generated, piped = report["outputs"]
    texts = ast.literal_eval(generated)  # the stock snippet prints a list of strings
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # The shipped pipeline gives the stock generate() output, in the 4.x format.
    assert ast.literal_eval(piped) == [{"translation_text": text} for text in texts]
    assert report["pipeline_modules"] and "trust_remote_code" in report["refused"]


def test_import_fngd_hf_does_not_import_translation_code():
    code = ("import sys, fngd_hf, fngd_hf.integrations.trainer\n"
            "from transformers.pipelines import PIPELINE_REGISTRY\n"
            "print(sorted(m for m in sys.modules if m.startswith('fngd_hf.translation')),"
            " 'translation' in PIPELINE_REGISTRY.get_supported_tasks())")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["[]", "False"]


def imported_modules(tree: ast.Module, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of ``package``, nested ones included;
    ``from .x import y`` counts as both ``package.x`` and ``package.x.y`` (y may be a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            base = ".".join(parent + ([node.module] if node.module else []))
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_the_library_imports_nothing_from_the_translation_app():
    """No module of fngd_hf outside fngd_hf/translation/ imports it, at module level or inside a function."""
    root = REPO / "fngd_hf"
    library = sorted(p for p in root.rglob("*.py") if p.relative_to(root).parts[0] != "translation")
    assert len(library) > 5
    offenders = [f"{path.relative_to(root)}:{line} {name}" for path in library
                 for line, name in imported_modules(ast.parse(path.read_text(encoding="utf-8")),
                                                    ".".join(("fngd_hf", *path.relative_to(root).parent.parts)))
                 if name == "fngd_hf.translation" or name.startswith("fngd_hf.translation.")]
    assert not offenders, offenders
    # The check sees relative imports at any depth (it can fail).
    assert "fngd_hf.translation.data" in {name for _, name in imported_modules(ast.parse("from .translation import data"), "fngd_hf")}
    assert "fngd_hf.translation" in {name for _, name in imported_modules(ast.parse("from ..translation import x"), "fngd_hf.sub")}


def test_the_shipped_pipeline_does_not_shadow_the_registered_task(checkpoint):
    """With fngd_hf.translation.pipeline imported, pipeline("translation") still needs no trust_remote_code."""
    from transformers import pipeline

    rows = pipeline("translation", model=str(checkpoint))(["A dog runs.", "Two men are outside."])
    assert [sorted(row) for row in rows] == [["translation_text"]] * 2
