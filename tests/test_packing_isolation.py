"""Packed samples never see each other: a packed row's logits and loss equal its samples run one by one."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftcore.config import FieldNames
from ftcore.data.batch import Piece, collate, collate_packed
from ftcore.data.formats import RecordSpec, tokenize_record
from ftcore.data.packing import BestFitPacker, block_causal_mask
from ftcore.train.sequence_parallel import model_inputs

CHATS = [
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
]


@pytest.fixture(scope="module")
def tok(builtin_model_dir):
    return AutoTokenizer.from_pretrained(builtin_model_dir)


def samples(tok):
    spec = RecordSpec("chat", "assistant", FieldNames())
    return [tokenize_record({"messages": m}, spec, tok) for m in CHATS]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_samples_one_by_one(builtin_model_dir, tok, attn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, attn_implementation=attn,
                                                 dtype=torch.float32).eval()
    parts = samples(tok)
    pieces = [Piece((i, 0), s, f"s{i}") for i, s in enumerate(parts)]
    width = sum(len(s) for s in parts) + 5  # with a padding tail
    packed = collate_packed([pieces], tok.pad_token_id)
    packed.input_ids = torch.nn.functional.pad(packed.input_ids, (0, 5), value=tok.pad_token_id)
    packed.labels = torch.nn.functional.pad(packed.labels, (0, 5), value=-100)
    packed.position_ids = torch.cat([packed.position_ids, torch.arange(5)[None]], dim=1)
    packed.seq_lens = [[len(s) for s in parts] + [5]]
    packed.attention_mask = torch.nn.functional.pad(packed.attention_mask, (0, 5))
    assert packed.input_ids.shape[1] == width

    with torch.no_grad():
        out = model(**model_inputs(packed, "cpu", attn, torch.float32).with_labels(), num_items_in_batch=1)
        offset, total = 0, 0.0
        for s in parts:
            alone = collate([s], tok.pad_token_id, [])
            ref = model(**model_inputs(alone, "cpu", attn).with_labels(), num_items_in_batch=1)
            got = out.logits[0, offset:offset + len(s)]
            torch.testing.assert_close(got, ref.logits[0], rtol=1e-5, atol=1e-5)
            total += ref.loss.item()
            offset += len(s)
    # Sum-reduced loss of the row == sum of the samples' losses (no cross-sample target, padding ignored).
    assert out.loss.item() == pytest.approx(total, rel=1e-5)

    # Without the mask the same row *does* mix samples: the test would catch a missing mask.
    with torch.no_grad():
        leaky = model(input_ids=packed.input_ids, use_cache=False).logits
    second = slice(len(parts[0]), len(parts[0]) + len(parts[1]))
    assert not torch.allclose(leaky[0, second], out.logits[0, second], atol=1e-3)


def test_block_causal_mask_shape_and_blocks():
    mask = block_causal_mask([[2, 3]], 5)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert mask.equal(expected.bool())


def test_best_fit_packer_fills_rows_and_serves_the_oldest_first():
    packer = BestFitPacker(10)
    for i, length in enumerate([6, 9, 3, 4, 1, 2]):
        packer.add(length, i)
    assert packer.pop_row() == [0, 3]  # oldest (6) + best fit for 4 left
    assert packer.pop_row() == [1, 4]  # 9 + 1
    assert packer.pop_row() == [2, 5]
    assert len(packer) == 0
    with pytest.raises(ValueError, match="cannot be packed into rows of 10"):
        packer.add(11, "too long")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn varlen needs a CUDA GPU (none here)")
def test_flash_varlen_packed_row_equals_samples(builtin_model_dir, tok):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install '.[flash]')")
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda().eval()
    parts = samples(tok)
    packed = collate_packed([[Piece((i, 0), s, f"s{i}") for i, s in enumerate(parts)]], tok.pad_token_id)
    with torch.no_grad():
        out = model(**model_inputs(packed, "cuda", "flash_attention_2", torch.bfloat16).with_labels())
        offset = 0
        for s in parts:
            ref = model(**model_inputs(collate([s], tok.pad_token_id, []), "cuda", "flash_attention_2").with_labels())
            torch.testing.assert_close(out.logits[0, offset:offset + len(s)], ref.logits[0], rtol=2e-2, atol=2e-2)
            offset += len(s)
