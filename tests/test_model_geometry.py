"""meta_skeleton, the one builder of models on the meta device (model-directory check, plan, export): parameters
on meta, buffers real, the dtype asked for, the head asked for; and the same in a process where a ZeRO-3 config
is alive (a training rank), where from_config would wrap the build in deepspeed.zero.Init."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoConfig

from ftcore.model_geometry import meta_skeleton


@pytest.fixture(scope="module")
def tiny_config(builtin_model_dir):
    return AutoConfig.from_pretrained(builtin_model_dir)


def test_a_skeleton_has_meta_parameters_real_buffers_and_the_dtype_asked_for(tiny_config):
    model = meta_skeleton(tiny_config, dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    buffers = dict(model.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())  # e.g. the rotary frequencies
    assert type(model).__name__ == "LlamaForCausalLM"
    head = meta_skeleton(AutoConfig.from_pretrained(tiny_config._name_or_path, num_labels=3), "sequence_classification")
    assert type(head).__name__ == "LlamaForSequenceClassification" and head.score.weight.shape[0] == 3


def test_a_tied_embedding_and_head_stay_one_parameter(tiny_config):
    """As loading ties them (ft plan counts a tied embedding and head once; accelerate's init_empty_weights alone
    would untie them)."""
    tied = AutoConfig.from_pretrained(tiny_config._name_or_path, tie_word_embeddings=True)
    model = meta_skeleton(tied)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = meta_skeleton(AutoConfig.from_pretrained(tiny_config._name_or_path, tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_a_skeleton_builds_while_a_zero3_config_is_alive(tiny_config):
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        model = meta_skeleton(tiny_config, dtype=torch.float16)
        assert {p.device.type for p in model.parameters()} == {"meta"}
        assert {p.dtype for p in model.parameters()} == {torch.float16}
        assert not any(hasattr(p, "ds_id") for p in model.parameters())  # not partitioned by zero.Init
        assert torch.get_default_dtype() == torch.float32  # put back
    finally:
        del keep
        gc.collect()
    assert not is_deepspeed_zero3_enabled()


def test_a_config_without_a_class_for_the_head_is_one_line(tiny_config):
    from transformers import CLIPVisionConfig

    with pytest.raises(ValueError, match="transformers has no AutoModelForCausalLM class for model_type"):
        meta_skeleton(CLIPVisionConfig())
