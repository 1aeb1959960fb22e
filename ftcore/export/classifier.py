"""Classification exports (`task: classification`, or a PEFT SEQ_CLS adapter): the model's
*ForSequenceClassification, without the language-model head, with the trained classification head, and
config.json with the architecture, id2label/label2id (the run's data.labels) and the pad token id the head reads
its prediction by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftcore.config import Config
from ftcore.data.batch import pad_token_id
from ftcore.export.base import BaseModel
from ftcore.export.lora import Adapter
from ftcore.export.options import ExportError
from ftcore.model_geometry import meta_skeleton
from ftcore.tasks import task_for


@dataclass
class Classifier:
    """What makes the export a sequence classifier: its tensor names and config.json settings."""

    names: set[str]  # every tensor the classification model has
    config: dict  # architectures, id2label, label2id, pad_token_id

    def model_class(self):
        """transformers' auto class the export loads as."""
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification


def is_classification(run_config: Optional[Config], adapter: Optional[Adapter] = None) -> bool:
    """The run's task trains a sequence-classification head, or the adapter is a PEFT SEQ_CLS one."""
    return (run_config is not None and task_for(run_config).head == "sequence_classification") or (
        adapter is not None and adapter.config.get("task_type") == "SEQ_CLS")


def build_classifier(base: BaseModel, run_config: Optional[Config], num_labels: int,
                     tokenizer_dirs: list[Path]) -> Classifier:
    """The classifier's tensor names (from the model built on the meta device) and config.json settings."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    labels = (run_config.data.labels if run_config else None) or [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise ExportError(f"the classification head has {num_labels} outputs but the run's data.labels lists "
                          f"{len(labels)} classes")
    architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(base.config.get("model_type"))
    if architecture is None:
        raise ExportError(f"{base.dir}: transformers has no sequence-classification model for model_type "
                          f"{base.config.get('model_type')!r}")
    pad = base.config.get("pad_token_id")
    for directory in tokenizer_dirs:  # the id the run padded with (ftcore.data.stream.pad_token_id)
        if directory is not None and (directory / "tokenizer_config.json").is_file():
            pad = pad_token_id(AutoTokenizer.from_pretrained(directory))
            break
    settings = {"architectures": [architecture], "id2label": {str(i): name for i, name in enumerate(labels)},
                "label2id": {name: i for i, name in enumerate(labels)}, "pad_token_id": pad}
    model = meta_skeleton(AutoConfig.from_pretrained(base.dir, num_labels=num_labels), "sequence_classification")
    return Classifier(set(model.state_dict()), settings)


def head_outputs(shapes: dict[str, tuple], base: BaseModel, where: str) -> int:
    """Classes of a classification head: the output size of the one 2-D weight (name -> shape) the base lacks."""
    heads = [n for n, shape in shapes.items() if n not in base.infos and n.endswith("weight") and len(shape) == 2]
    if len(heads) != 1:
        raise ExportError(f"{where}: expected one classification head weight beside the base's tensors, found "
                          f"{len(heads)}: {[n for n in shapes if n not in base.infos][:4]}")
    return shapes[heads[0]][0]


