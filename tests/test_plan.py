"""`ft plan`: the model built on the meta device (no weights), per-GPU memory for every ZeRO layout, checked
against DeepSpeed's own estimators; the per-rank engine bytes are checked against real runs in test_multiproc.py
and test_qlora.py."""

from __future__ import annotations

import json

import pytest

from ftcore.config import load_config
from ftcore.tools.plan import build_facts, make_plan
from tests.conftest import ft_in_process

EXAMPLES = {"7b": "examples/llama-2-7b-lora.yaml", "13b": "examples/llama-2-13b-lora.yaml",
            "70b": "examples/llama-2-70b-qlora.yaml"}
PARAMS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}  # Llama-2 parameter counts


def full_finetune_plan(size: str, gpus: int, nodes: int):
    cfg = load_config(EXAMPLES[size], ["adapter.method=full", "distributed.zero_stage=2"])
    facts = build_facts(cfg, cfg.model.name_or_path)
    return facts, make_plan(cfg, facts, gpus, nodes, None)


@pytest.mark.parametrize("size", list(EXAMPLES))
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 4)])
def test_model_states_agree_with_deepspeeds_estimators(size, gpus, nodes):
    """DeepSpeed's estimators take the parameter count and largest layer (what its *_all_live variants read
    from a real model, which would need the weights in memory): given the meta model's, they agree."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    facts, plan = full_finetune_plan(size, gpus, nodes)
    assert facts.total == PARAMS[size]
    rows = {(r.stage, r.offload): r for r in plan.rows}
    total, largest = facts.total, facts.largest_layer
    expected = {
        (2, "none"): estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False),
        (2, "optimizer"): estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=True),
        (3, "none"): estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False),
        (3, "optimizer"): estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=True,
                                                                cpu_offload_params=False),
        (3, "all"): estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=True,
                                                          cpu_offload_params=True),
    }
    for layout, estimate in expected.items():
        cpu, gpu = estimate[0], estimate[1]
        ours = rows[layout].model_states
        assert abs(ours - gpu) <= 0.05 * gpu, (layout, ours, gpu)
        if layout[0] == 3 and layout[1] != "none":  # ZeRO-3 offload: host RAM per node, 1.5x buffer included
            assert abs(rows[layout].host_ram_per_node - cpu) <= 0.05 * cpu, (layout, rows[layout].host_ram_per_node,
                                                                              cpu)


def test_qlora_70b_plan_partitions_the_4bit_base():
    cfg = load_config(EXAMPLES["70b"], [])
    facts = build_facts(cfg, cfg.model.name_or_path)
    one, two = (make_plan(cfg, facts, gpus, 1, None) for gpus in (1, 2))
    rows1 = {(r.stage, r.offload): r for r in one.rows}
    rows2 = {(r.stage, r.offload): r for r in two.rows}
    # Every linear layer but the output head is 4-bit: 0.5 B per weight + double-quantized absmax.
    assert facts.quantized == facts.total - facts.trainable - 2 * 32000 * 8192 - (2 * 80 + 1) * 8192
    assert 0.50 * facts.quantized <= rows1[(0, "none")].quantized_base <= 0.52 * facts.quantized
    # ZeRO-3 halves the packed weights on 2 GPUs (the small quantization constants stay whole); ZeRO-2 does not.
    packed = facts.quantized / 2
    overhead = rows1[(3, "none")].quantized_base - packed
    assert rows2[(3, "none")].quantized_base == pytest.approx(packed / 2 + overhead, rel=1e-3)
    assert rows2[(2, "none")].quantized_base == rows1[(2, "none")].quantized_base
    assert facts.trainable == 207_093_760  # r=16 on q,k,v,o,gate,up,down of 80 layers
    assert not rows2[(3, "all")].supported


def test_ft_plan_cli_prints_the_table_and_a_recommendation():
    proc = ft_in_process("plan", EXAMPLES["70b"], "--gpus-per-node", "2", "--gpu-mem-gb", "40")
    assert "69.18 B parameters, 207.1 M trainable, 68.45 B in 4-bit NF4" in proc.stdout
    assert "ZeRO-3 offload all: qlora + parameter offload is not supported" in proc.stdout
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("recommended:")][0]
    assert "ZeRO-3, offload none, gradient checkpointing on" in line
    assert "--set distributed.zero_stage=3 --set distributed.offload=none --set model.gradient_checkpointing=true" \
        in proc.stdout
    # The rest in-process (same CLI code, the imports paid once): the subprocess above is the console entry.
    data = json.loads(ft_in_process("plan", EXAMPLES["70b"], "--gpus-per-node", "2", "--gpu-mem-gb", "40",
                             "--json").stdout)
    assert data["recommendation"]["zero_stage"] == 3 and data["world"] == 2
    assert data["recommendation"]["per_gpu_bytes"] <= 40 * 1024 ** 3
    too_small = ft_in_process("plan", EXAMPLES["70b"], "--gpus-per-node", "1", "--gpu-mem-gb", "8").stdout
    assert "nothing fits in 8 GiB per GPU" in too_small
    bad = ft_in_process("plan", EXAMPLES["7b"], "--gpus-per-node", "0", check=False)
    assert bad.returncode == 2 and "--gpus-per-node and --nodes must be >= 1" in bad.stderr


def test_base_kl_reference_copy_is_counted():
    cfg = load_config(EXAMPLES["7b"], ["adapter.method=full"])
    with_kl = load_config(EXAMPLES["7b"], ["adapter.method=full", "loss.base_kl=0.1"])
    facts = build_facts(cfg, cfg.model.name_or_path)
    plain = {(r.stage, r.offload): r for r in make_plan(cfg, facts, 8, 1, None).rows}
    kl = {(r.stage, r.offload): r for r in make_plan(with_kl, build_facts(with_kl, cfg.model.name_or_path), 8, 1,
                                                      None).rows}
    assert kl[(2, "none")].weights - plain[(2, "none")].weights == facts.total * 2  # bf16 copy
    # ZeRO-3: the copy is partitioned like the model, 1/8 of it per GPU.
    assert kl[(3, "none")].weights - plain[(3, "none")].weights == pytest.approx(facts.total * 2 / 8)


@pytest.mark.parametrize("overrides,head_trainable", [
    (["adapter.method=lora"], 0),
    (["adapter.method=lora", "adapter.target_modules=[q_proj, lm_head]"], 16 * (4096 + 32000)),
    (["adapter.method=full"], 32000 * 4096),
])
def test_the_loss_memory_of_the_chosen_implementation_and_of_full(overrides, head_trainable):
    """Llama-2-7B, bf16, 2 x 4096 tokens: full holds the logits (2 B), their fp32 copy and gradient (8 B);
    chunked holds one chunk (2 + 4 B): as many tokens as fit 256 MiB of fp32 logits at a 32,000-row vocabulary,
    2,097; the hidden states' gradient and the trained head's fp32 gradient; with base_kl the base's logits and
    probabilities join the chunk (2 + 8 B more)."""
    base = ["train.micro_batch_size=2", "data.max_seq_len=4096", "adapter.r=16", *overrides]
    tokens, vocab, hidden = 2 * 4096, 32000, 4096
    for impl, kl in (("auto", 0.0), ("chunked", 0.0), ("chunked", 0.5), ("full", 0.0)):
        cfg = load_config(EXAMPLES["7b"], [*base, f"loss.impl={impl}", f"loss.base_kl={kl}"])
        facts = build_facts(cfg, cfg.model.name_or_path)
        assert facts.head_trainable == head_trainable
        plan = make_plan(cfg, facts, 1, 1, None)
        assert plan.loss["full_bytes"] == tokens * vocab * 10
        if impl == "full":
            assert plan.loss["bytes"] == plan.loss["full_bytes"]
            continue
        per_logit = 6 + (10 if kl else 0)
        assert plan.loss["bytes"] == 2097 * vocab * per_logit + tokens * hidden * 2 + head_trainable * 4
        assert plan.loss["bytes"] < plan.loss["full_bytes"]
    proc = ft_in_process("plan", EXAMPLES["7b"], *(w for o in base for w in ("--set", o)), "--gpus-per-node", "1")
    assert "loss: auto (fused on CUDA with liger-kernel, else chunked)" in proc.stdout
    assert f"(loss.impl=full would hold {tokens * vocab * 10 / 2 ** 30:.1f} GiB of logits)" in proc.stdout


def test_sequence_parallelism_divides_the_activations_and_lengthens_what_fits(tmp_path):
    """Llama-3.1-8B's shapes (131,072 positions) on 8 GPUs: sequence_parallel=8 holds 1/8 of the tokens per GPU,
    so the activations shrink 8x and the longest data.max_seq_len that fits in 10 GiB (checkpointed) grows 8x."""
    model = tmp_path / "llama-3.1-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "vocab_size": 128256, "tie_word_embeddings": False}))
    rows = {}
    for sp in (1, 8):
        cfg = load_config(EXAMPLES["7b"], [f"model.name_or_path={model}", "data.max_seq_len=16384",
                                           "train.micro_batch_size=1", f"distributed.sequence_parallel={sp}"])
        plan = make_plan(cfg, build_facts(cfg, str(model)), 8, 1, 10)
        rows[sp] = next(r for r in plan.rows if (r.stage, r.offload) == (3, "none"))
    # 1/8 of the tokens (the loss's one chunk of logits does not shrink with them).
    assert rows[1].activations_full / 8 < rows[8].activations_full < rows[1].activations_full / 7
    assert rows[1].longest_seq_len >= 4096 and not rows[8].longest_is_model_limit
    assert rows[8].longest_seq_len >= 7.9 * rows[1].longest_seq_len and rows[8].longest_seq_len % (64 * 8) == 0
    text = ft_in_process("plan", EXAMPLES["7b"], "--gpus-per-node", "8", "--gpu-mem-gb", "24", "--set",
                         f"model.name_or_path={model}", "--set", "data.max_seq_len=16384", "--set",
                         "distributed.sequence_parallel=8").stdout
    assert "sequence parallel 8: 2,048 tokens per GPU" in text and "longest seq" in text
    bad = ft_in_process("plan", EXAMPLES["7b"], "--gpus-per-node", "3", "--set", "distributed.sequence_parallel=2",
                        check=False)
    assert bad.returncode != 0 and "distributed.sequence_parallel=2 does not divide 3 GPUs" in bad.stderr


def test_an_rl_rollout_counts_the_kv_cache_transformers_holds_and_the_gathered_model(builtin_model_dir):
    """Task rl: the plan's KV cache is what the model's own cache holds after a group's rows reach
    data.max_seq_len (measured on the tiny model); under ZeRO-3 the whole model gathered for generation adds the
    rest of the weights, unless the gathered model does not fit --gpu-mem-gb (auto: layer by layer) or
    rl.zero3_generation is layered; the totals hold the larger of the rollout and the activations."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftcore.model_geometry import kv_cache_bytes
    from ftcore.tools.plan import rollout_bytes

    sets = ["task=rl", "data.train=[{path: builtin:add-two-digits, format: chat}]",
            "rl.rewards=[{function: exact_answer}]", "model.dtype=float32", "adapter.method=full",
            "rl.num_generations=3", "data.max_seq_len=40", "rl.max_new_tokens=8"]
    cfg = load_config(None, sets)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32)
    with torch.no_grad():
        cache = model(torch.ones((3, 40), dtype=torch.long), use_cache=True).past_key_values
    held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(model.config, 3, 40, 4) == held
    facts = build_facts(cfg, builtin_model_dir)
    assert rollout_bytes(cfg, facts, 0.0) == held + 3 * facts.vocab * 4
    rows = {(r.stage, r.offload): r for r in make_plan(cfg, facts, 4, 1, None).rows}
    assert not rows[(2, "none")].rollout_gathers and rows[(2, "none")].rollout == rollout_bytes(cfg, facts, 0.0)
    # Llama-2-7B on 8 GPUs, ZeRO-3: gathering adds the 7/8 of the bf16 weights this rank does not hold (less the
    # working set of gathered layers it holds anyway).
    big = load_config(EXAMPLES["7b"], [*sets[:3], "adapter.method=full", "rl.num_generations=8"])
    big_facts = build_facts(big, big.model.name_or_path)
    zero3 = [r for r in make_plan(big, big_facts, 8, 1, None).rows if r.stage == 3][0]
    added = big_facts.total * 2 - zero3.weights - zero3.trainable_weights
    assert zero3.rollout_gathers and added > big_facts.total * 2 * 0.8
    assert zero3.rollout == rollout_bytes(big, big_facts, added)
    assert zero3.total(True) == zero3.model_states + max(zero3.rollout, zero3.activations_checkpointed) + 2**30
    tight = make_plan(big, big_facts, 8, 1, (zero3.total(True) - 1) / 2**30)
    assert not [r for r in tight.rows if r.stage == 3][0].rollout_gathers  # auto: layer by layer
    layered = load_config(EXAMPLES["7b"], [*sets[:3], "adapter.method=full", "rl.zero3_generation=layered"])
    assert not [r for r in make_plan(layered, big_facts, 8, 1, None).rows if r.stage == 3][0].rollout_gathers
