"""task: classification: a sequence-classification head trained with real DeepSpeed on a small real-text task
(which license a sentence comes from). It must learn (accuracy clearly above always answering the majority
class), its reported metrics must equal an independent computation (scikit-learn) from the predictions it saved,
and the exported model, loaded with AutoModelForSequenceClassification, must make the same predictions. Also:
full, QLoRA and freeze runs, the label set, and the errors on bad labels and configs."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from ftcore.builtin import BUILTIN_DATA
from ftcore.config import ConfigError, DataConfig, DataSource, load_config
from ftcore.data.stream import DataError, discover_labels
from ftcore.metrics import classification_scores
from tests.conftest import ft_in_process, read_jsonl, run_ft

EXAMPLE = "examples/classify-licenses.yaml"
EVAL_FILE = BUILTIN_DATA["license-sentences-eval"]


def eval_texts() -> dict[str, str]:
    """Sample id (file:line, as the run records it) -> text."""
    lines = EVAL_FILE.read_text().splitlines()
    return {f"{i}": json.loads(line)["text"] for i, line in enumerate(lines, 1)}


def predict(model_dir: Path, ids: list[str]) -> list[str]:
    """What a user gets from the exported model: one text at a time, tokenized by its own tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = eval_texts()
    out = []
    with torch.no_grad():
        for sample_id in ids:
            logits = model(**tokenizer(texts[sample_id.rsplit(":", 1)[1]], return_tensors="pt")).logits
            out.append(model.config.id2label[int(logits.argmax())])
    return out


def last_eval(out: Path) -> dict:
    return json.loads(sorted((out / "eval").glob("step*.json"))[-1].read_text())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("classify") / "lora"
    proc = run_ft("launch", EXAMPLE, "--nproc", "2", "--set", f"output_dir={out}")
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return out


@pytest.mark.multiproc
@pytest.mark.trains
def test_classifier_learns_above_the_majority_class(lora_run):
    report = last_eval(lora_run)
    labels = [p["label"] for p in report["predictions"]]
    majority = collections.Counter(labels).most_common(1)[0][1] / len(labels)
    assert len(labels) == len(EVAL_FILE.read_text().splitlines())  # every eval sample, each once, over 2 ranks
    assert report["accuracy"] > majority + 0.1, (report["accuracy"], majority)
    evals = [r for r in read_jsonl(lora_run / "metrics.jsonl") if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [40, 80, 120]  # every eval_every steps and at the end
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


@pytest.mark.multiproc
@pytest.mark.trains
def test_metrics_equal_an_independent_computation_from_the_saved_predictions(lora_run):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    for path in sorted((lora_run / "eval").glob("step*.json")):
        report = json.loads(path.read_text())
        gold = [p["label"] for p in report["predictions"]]
        predicted = [p["prediction"] for p in report["predictions"]]
        assert report["accuracy"] == pytest.approx(accuracy_score(gold, predicted), abs=1e-12)
        assert report["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro", zero_division=0),
                                                   abs=1e-12)
        assert report["confusion"] == confusion_matrix(gold, predicted, labels=report["labels"]).tolist()
        row = next(r for r in read_jsonl(lora_run / "metrics.jsonl")
                   if r["step"] == report["step"] and "eval_accuracy" in r)
        assert (row["eval_accuracy"], row["eval_macro_f1"], row["eval_confusion"]) == \
            (report["accuracy"], report["macro_f1"], report["confusion"])


@pytest.mark.multiproc
@pytest.mark.trains
def test_lora_export_is_a_classifier_that_reproduces_the_predictions(lora_run, tmp_path):
    adapter_config = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    merged = tmp_path / "merged"
    ft_in_process("export", "--adapter", str(lora_run / "final"), "--out", str(merged))
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {"0": "apache-2.0", "1": "gfdl-1.3", "2": "gpl-3.0", "3": "mpl-2.0"}
    report = last_eval(lora_run)
    ids = [p["id"] for p in report["predictions"]]
    assert predict(merged, ids) == [p["prediction"] for p in report["predictions"]]
    # The same from the last checkpoint (consolidated from the ZeRO-2 partitions of both ranks).
    from_checkpoint = tmp_path / "from-checkpoint"
    ft_in_process("export", "--checkpoint", str(lora_run / "checkpoints" / "step-000120"), "--out",
                  str(from_checkpoint))
    assert predict(from_checkpoint, ids) == [p["prediction"] for p in report["predictions"]]


METHODS = {
    "full": ("--set", "adapter.method=full", "--set", "optimizer.lr=5e-4"),
    "freeze": ("--set", "adapter.method=freeze", "--set", "adapter.trainable=['layers\\.3\\.']"),
    "qlora": ("--set", "adapter.method=qlora"),
}


@pytest.mark.multiproc
@pytest.mark.trains
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_a_classifier_that_exports(method, tmp_path, builtin_model_dir):
    out = tmp_path / method
    run_ft("launch", EXAMPLE, "--nproc", "2", "--set", f"output_dir={out}", "--set", "train.max_steps=12",
           "--set", "evaluation.every=0", "--set", "checkpoint.every_steps=0", *METHODS[method])
    report = last_eval(out)
    ids, trained = [p["id"] for p in report["predictions"]], [p["prediction"] for p in report["predictions"]]
    if method == "qlora":
        model_dir = tmp_path / "merged"  # merged onto the NF4 round trip of the base the run trained on
        ft_in_process("export", "--adapter", str(out / "final"), "--out", str(model_dir))
    else:
        model_dir = out / "final"  # already a Hugging Face classifier
        from safetensors.torch import load_file

        final, base = load_file(model_dir / "model.safetensors"), load_file(f"{builtin_model_dir}/model.safetensors")
        assert "lm_head.weight" not in final and final["score.weight"].shape == (4, 128)
        if method == "freeze":  # only the chosen block and the new head trained
            changed = {k for k in final if k in base and not torch.equal(final[k], base[k])}
            assert changed and all("layers.3." in k for k in changed)
    agree = sum(a == b for a, b in zip(predict(model_dir, ids), trained))
    assert agree == len(ids), (agree, len(ids))


# ---------------------------------------------------------------------------------------------- units
def test_scores_match_scikit_learn_on_random_predictions():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    g = torch.Generator().manual_seed(0)
    for classes in (2, 3, 7):
        gold = torch.randint(0, classes, (200,), generator=g).tolist()
        predicted = torch.randint(0, classes - 1, (200,), generator=g).tolist()  # one class never predicted
        scores = classification_scores(gold, predicted, classes)
        assert scores["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
        assert scores["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro", zero_division=0))
        assert scores["confusion"] == confusion_matrix(gold, predicted, labels=list(range(classes))).tolist()


def write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_label_set_is_found_in_the_data_or_taken_from_the_config(tmp_path):
    names = write(tmp_path / "names.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "ham"}])
    ids = write(tmp_path / "ids.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    mixed = write(tmp_path / "mixed.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": "ham"}])
    source = lambda p: [DataSource(path=str(p), format="classification")]  # noqa: E731
    assert discover_labels(DataConfig(train=source(names))) == ["ham", "spam"]
    assert discover_labels(DataConfig(train=source(ids))) == ["0", "1", "2"]
    assert discover_labels(DataConfig(train=source(names), labels=["spam", "ham", "eggs"])) == ["spam", "ham", "eggs"]
    with pytest.raises(DataError, match="mixes class names"):
        discover_labels(DataConfig(train=source(mixed)))


@pytest.mark.parametrize("record, message", [
    ({"text": "x", "label": "eggs"}, "label 'eggs' is not one of data.labels (ham, spam)"),
    ({"text": "x", "label": 5}, "label id 5 is outside 0..1"),
    ({"text": "x"}, "classification field 'label' is missing"),
    ({"text": "x", "label": [1]}, "classification field 'label' is list"),
    ({"label": "ham"}, "classification field 'text' is missing"),
])
def test_bad_label_names_the_line(tmp_path, record, message):
    path = write(tmp_path / "data.jsonl", [{"text": "fine", "label": "ham"}, record])
    # The data error is found once the training runtime has started: a real process, which trains nothing.
    proc = run_ft("train", "--set", "task=classification", "--set", f"data.train=[{{path: {path}, format: "
                  "classification}]", "--set", "data.labels=[ham, spam]", "--set", "train.max_steps=2",
                  "--set", "train.micro_batch_size=2", "--set", f"output_dir={tmp_path / 'out'}", check=False,
                  trains=False)
    assert proc.returncode != 0
    assert f"{path}:2: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["task=classification"], "data.train.0.format: task classification reads format classification"),
    (["data.train=[{path: x.jsonl, format: classification}]"], "format classification needs task: classification"),
    (["task=classification", "data.train=[{path: x.jsonl, format: classification}]", "data.packing=true"],
     "data.packing: does not apply to task classification"),
    (["task=classification", "data.train=[{path: x.jsonl, format: classification}]", "loss.base_kl=0.1"],
     "loss.base_kl: applies to task causal_lm"),
    (["task=classification", "data.train=[{path: x.jsonl, format: classification}]", "data.labels=[a, a]"],
     "data.labels: needs at least two distinct class names"),
    (["data.labels=[a, b]"], "data.labels: applies to task classification only"),
])
def test_config_errors_name_the_field(overrides, message):
    args = [a for o in overrides for a in ("--set", o)]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides=[a for a in args if a != "--set"])
