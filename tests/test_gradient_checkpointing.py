"""Non-reentrant gradient checkpointing with LoRA: same loss and gradients as without it."""

import torch

from ftcore.config import load_config
from ftcore.model import load_model


def lora_grads(model_dir: str, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    cfg = load_config(None, [f"model.gradient_checkpointing={str(checkpointing).lower()}", "adapter.dropout=0",
                             "model.attn_implementation=sdpa", "train.seed=0"])
    model = load_model(cfg, model_dir, torch.device("cpu"))
    # LoRA B starts at zero, so A would get no gradient: move B off zero for a meaningful comparison.
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.train()
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_gives_same_lora_gradients(builtin_model_dir):
    loss_plain, plain = lora_grads(builtin_model_dir, checkpointing=False)
    loss_ckpt, ckpt = lora_grads(builtin_model_dir, checkpointing=True)
    assert plain.keys() == ckpt.keys() and len(plain) == 4 * 7 * 2
    assert loss_plain == loss_ckpt
    for name in plain:
        assert ckpt[name].abs().sum() > 0, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)


def test_checkpointing_is_really_on(builtin_model_dir):
    cfg = load_config(None, ["model.gradient_checkpointing=true", "train.seed=0"])
    model = load_model(cfg, builtin_model_dir, torch.device("cpu"))
    assert model.base_model.model.is_activation_checkpointing
