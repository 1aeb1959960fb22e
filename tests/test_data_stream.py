"""The train stream: mixing, overflow, bad records, packing, exact resume by seeking, and elastic resume."""

import collections
import json

import pytest
from transformers import AutoTokenizer

from ftcore.config import load_config
from ftcore.data import sources
from ftcore.data.formats import IGNORE_INDEX
from ftcore.data.order import WINDOW_BLOCKS
from ftcore.data.stream import DataError, TrainStream, restore_states
from ftcore.tasks import task_for


@pytest.fixture(scope="module")
def tok(builtin_model_dir):
    return AutoTokenizer.from_pretrained(builtin_model_dir)


def chat(i, answer_words=1):
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": " ".join([f"a{i}"] * answer_words)}]}


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def make_stream(tok, sources_yaml, rank=0, world=1, mbs=2, seed=3, **over):
    cfg = load_config(None, [f"data.train={sources_yaml}", *[f"data.{k}={v}" for k, v in over.items()]])
    return TrainStream(cfg.data, tok, seed=seed, rank=rank, world_size=world, micro_batch_size=mbs,
                       task=task_for(cfg))


def ids_of(batches):
    return [i.rsplit("/", 1)[-1] for b in batches for i in b.sample_ids]


def tagged(batch):
    return [(q, i.rsplit("/", 1)[-1]) for q, i in zip(batch.positions, batch.sample_ids)]


def test_weighted_mix_follows_the_weights_deterministically(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(i) for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(i) for i in range(400)])
    spec = f"[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1}}]"
    def draw(seed):
        s = make_stream(tok, spec, mbs=8, seed=seed)
        return ids_of([s.next_batch() for _ in range(100)])

    first, again, other_seed = draw(3), draw(3), draw(4)
    assert first == again and first != other_seed
    share_a = sum(i.startswith("a.jsonl") for i in first) / len(first)
    assert abs(share_a - 0.75) < 0.01  # 800 draws at 3:1
    # The small source repeats (16 epochs of 50), each record equally often; the large one is subsampled once.
    counts_a = collections.Counter(i for i in first if i.startswith("a.jsonl"))
    assert len(counts_a) == 50 and max(counts_a.values()) - min(counts_a.values()) <= 1
    assert max(collections.Counter(i for i in first if i.startswith("b.jsonl")).values()) == 1


def test_overflow_modes_count_what_they_do(tmp_path, tok):
    long_text = " ".join(f"w{i}" for i in range(300))
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": long_text}, {"text": "short one"}])
    spec = f"[{{path: {path}, format: text}}]"
    full = tok(long_text, add_special_tokens=False)["input_ids"]
    full = [tok.bos_token_id] + full + [tok.eos_token_id]

    s = make_stream(tok, spec, shuffle="false", overflow="split", max_seq_len=64, mbs=1)
    pieces = [s.next_batch() for _ in range(len(full) // 63 + 1)]
    assert s.counters["split_records"] == 1 and s.counters["split_pieces"] == len(pieces)
    assert [b.sample_ids[0].rsplit("#", 1)[1] for b in pieces] == [str(i) for i in range(len(pieces))]
    # Chunks overlap by one token; together they train every token but the first exactly once.
    trained = [t for b in pieces for t, label in zip(b.input_ids[0].tolist(), b.labels[0].tolist())
               if label != IGNORE_INDEX]
    assert trained == full[1:]
    assert all(b.input_ids.shape[1] <= 64 for b in pieces)

    s = make_stream(tok, spec, shuffle="false", overflow="drop", max_seq_len=64, mbs=1)
    assert ids_of([s.next_batch()]) == ["t.jsonl:2"] and s.counters["dropped_too_long"] == 1

    s = make_stream(tok, spec, shuffle="false", overflow="truncate", max_seq_len=64, mbs=2)
    batch = s.next_batch()
    assert batch.input_ids.shape[1] == 64 and s.counters["truncated"] == 1
    with pytest.raises(Exception, match="data.overflow: 'split' applies to format text only"):
        load_config(None, [f"data.train=[{{path: {path}, format: chat}}]", "data.overflow=split"])


BAD_RECORDS = [
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]', "invalid JSON"),
    (b'{"messages": []}', "chat field 'messages' must be a non-empty list of turns (is empty)"),
    (b'{"msgs": []}', "chat field 'messages' must be a non-empty list of turns (is missing)"),
    (b'{"messages": [{"role": "user", "content": "q"}]}', "chat record has no assistant turn"),
    (b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
     "messages[0].content is int, not a string"),
    (b'{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "messages[0].role is 'robot'"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "a"}]}',
     "invalid UTF-8 at byte"),
    (b'[1, 2]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line, reason", BAD_RECORDS)
def test_bad_records_raise_with_file_line_or_are_skipped_and_reported(tmp_path, tok, line, reason):
    good = json.dumps(chat(0)).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"\n" + line + b"\n" + good + b"\n")
    spec = f"[{{path: {path}}}]"
    s = make_stream(tok, spec, shuffle="false", mbs=1)
    s.next_batch()
    with pytest.raises(DataError) as err:
        s.next_batch()
    assert f"d.jsonl:2: {reason}" in str(err.value) and "\n" not in str(err.value)
    s = make_stream(tok, spec, shuffle="false", mbs=3, on_error="skip")
    assert ids_of([s.next_batch()]) == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:1"]
    assert s.counters["skipped_errors"] == 1 and reason in s.report()["error_examples"][0]


def test_configurable_fields_and_roles(tmp_path, tok):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    s = make_stream(tok, f"[{{path: {path}, fields: {{messages: conversations, role: from, content: value}}, "
                         f"roles: {{human: user, gpt: assistant}}}}]", mbs=1)
    batch = s.next_batch()
    trained = [t for t, label in zip(batch.input_ids[0].tolist(), batch.labels[0].tolist()) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "hello</s>"


def test_no_trainable_token_fails_before_training(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q " * 50},
                                                            {"role": "assistant", "content": "a"}]}] * 3)
    s = make_stream(tok, f"[{{path: {path}}}]", max_seq_len=16)
    with pytest.raises(DataError, match=r"3 records in a row gave nothing to train on .* no trained token left: 3"):
        s.prime()


def skewed_records(n, seed=0):
    """Many short, a few long conversations."""
    import random

    rng = random.Random(seed)
    return [chat(i, answer_words=rng.choice([120, 150]) if rng.random() < 0.05 else rng.randint(1, 12))
            for i in range(n)]


def test_packing_is_full_and_loses_no_sample(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", skewed_records(3000))
    s = make_stream(tok, f"[{{path: {path}}}]", packing="true", max_seq_len=512, mbs=4, packing_buffer=256)
    batches = [s.next_batch() for _ in range(40)]
    assert s.packing_efficiency >= 0.98
    seen = ids_of(batches)
    assert len(seen) == len(set(seen))  # within the first epoch no sample twice
    for b in batches:
        assert b.input_ids.shape[1] <= 512
        for row, lens in enumerate(b.seq_lens):
            assert sum(lens) == b.input_ids.shape[1]
            starts = [sum(lens[:k]) for k in range(len(lens))]
            # positions restart at every sample; no sample's first token is a target
            assert all(b.position_ids[row, s].item() == 0 for s in starts)
            assert all(b.labels[row, s].item() == IGNORE_INDEX for s in starts)
    # Everything read was either emitted or is still in the buffer: nothing dropped on the floor.
    assert s.counters["records"] == len(seen) + len(s.state_dict()["buffer"])


@pytest.mark.parametrize("packing", ["false", "true"])
def test_resume_seeks_and_gives_identical_batches(tmp_path, tok, monkeypatch, packing):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 2000)  # many blocks, so seeking is visible
    path = write_jsonl(tmp_path / "d.jsonl", skewed_records(2000))
    spec = f"[{{path: {path}}}]"
    opts = dict(packing=packing, max_seq_len=256, mbs=2, packing_buffer=32, rank=1, world=2)
    straight = make_stream(tok, spec, **opts)
    for _ in range(150):
        straight.next_batch()
    state = json.loads(json.dumps(straight.state_dict()))
    expected = [straight.next_batch() for _ in range(5)]

    resumed = make_stream(tok, spec, **opts)
    resumed.load_state_dict(state)
    # Seeking: only blocks holding buffered samples were read (a couple of shuffle windows at most), not the
    # hundreds of blocks the uninterrupted stream went through to get here.
    assert resumed.groups[0].blocks_read <= 2 * (WINDOW_BLOCKS + 1)
    assert straight.groups[0].blocks_read > 10 * resumed.groups[0].blocks_read
    for want in expected:
        got = resumed.next_batch()
        assert got.sample_ids == want.sample_ids
        assert got.input_ids.equal(want.input_ids) and got.labels.equal(want.labels)
        if packing == "true":
            assert got.seq_lens == want.seq_lens and got.position_ids.equal(want.position_ids)


@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("packing", ["false", "true"])
def test_elastic_resume_loses_and_repeats_nothing(tmp_path, tok, old_world, new_world, packing):
    n = 300
    path = write_jsonl(tmp_path / "d.jsonl", skewed_records(n))
    spec = f"[{{path: {path}}}]"
    opts = dict(packing=packing, max_seq_len=512, mbs=2, packing_buffer=16)
    before = [make_stream(tok, spec, rank=r, world=old_world, **opts) for r in range(old_world)]
    seen = []
    for _ in range(7):
        for s in before:
            seen += tagged(s.next_batch())
    states = json.loads(json.dumps([s.state_dict() for s in before]))
    after = [make_stream(tok, spec, rank=r, world=new_world, **opts) for r in range(new_world)]
    for s, state in zip(after, restore_states(states, new_world)):
        s.load_state_dict(state)
    assert 0 < len(seen) < n
    while len(seen) < 2 * n:  # well into the second epoch on every rank
        for s in after:
            seen += tagged(s.next_batch())
    first_epoch = [sample for position, sample in seen if position < n]
    # Over the epoch each sample exactly once: what the old ranks trained on plus what the new ranks read.
    assert sorted(first_epoch) == sorted(f"d.jsonl:{i}" for i in range(1, n + 1))
