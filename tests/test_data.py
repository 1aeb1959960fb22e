"""Formats, loss masks, rank sharding and exact stream resume on the built-in tokenizer."""

import json

import pytest
from transformers import AutoTokenizer

from ftcore.config import FieldNames, load_config
from ftcore.data.batch import pad_eval_batches
from ftcore.data.formats import IGNORE_INDEX, RecordError, RecordSpec
from ftcore.data.formats import tokenize_record as _tokenize
from ftcore.data.stream import DataError, TrainStream, eval_batches, restore_states
from ftcore.tasks import task_for


@pytest.fixture(scope="module")
def tok(builtin_model_dir):
    return AutoTokenizer.from_pretrained(builtin_model_dir)


def tokenize_record(record, fmt, train_on, tok, **spec):
    return _tokenize(record, RecordSpec(fmt, train_on, spec.pop("fields", FieldNames()), **spec), tok)


def trained_text(tok, sample):
    return tok.decode([i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX])


CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of Peru?"},
                     {"role": "assistant", "content": "Lima."}]}


def test_chat_trains_every_assistant_turn_and_eos_only(tok):
    sample = tokenize_record(CHAT, "chat", "assistant", tok)
    assert trained_text(tok, sample) == "Hello!</s>Lima.</s>"
    # The whole conversation is one tokenization: prompt tokens are there, just not trained.
    assert "Capital of Peru?" in tok.decode(sample.input_ids)


def test_last_assistant_and_all(tok):
    assert trained_text(tok, tokenize_record(CHAT, "chat", "last_assistant", tok)) == "Lima.</s>"
    everything = tokenize_record(CHAT, "chat", "all", tok)
    # Every token but the first (which nothing predicts) is trained.
    assert everything.labels[0] == IGNORE_INDEX and everything.labels[1:] == everything.input_ids[1:]


def test_alpaca_trains_the_output_only(tok):
    sample = tokenize_record({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca", "completion", tok)
    assert trained_text(tok, sample) == "5</s>"
    assert "2 and 3" in tok.decode(sample.input_ids)


def test_text_trains_everything_with_bos_eos(tok):
    sample = tokenize_record({"text": "to be or not to be"}, "text", "all", tok)
    assert sample.input_ids[0] == tok.bos_token_id and sample.input_ids[-1] == tok.eos_token_id
    assert sample.labels[0] == IGNORE_INDEX and sample.labels[1:] == sample.input_ids[1:]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records(n):
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def stream(tmp_path, tok, rank, world, records=None, **over):
    path = write_jsonl(tmp_path / "d.jsonl", records if records is not None else chat_records(50))
    cfg = load_config(None, [f"data.train=[{{path: {path}, format: chat}}]",
                             *[f"{k}={v}" for k, v in over.items()]])
    return TrainStream(cfg.data, tok, seed=3, rank=rank, world_size=world, micro_batch_size=2, task=task_for(cfg))


def test_ranks_read_disjoint_equal_shares(tmp_path, tok):
    seen = []
    for rank in range(3):
        s = stream(tmp_path, tok, rank, 3)
        seen.append([i for _ in range(8) for i in s.next_batch().sample_ids])  # 16 of the 16 per rank
    assert all(len(x) == 16 and len(set(x)) == 16 for x in seen)
    assert not (set(seen[0]) & set(seen[1])) and not (set(seen[1]) & set(seen[2]))


def test_resume_continues_exactly(tmp_path, tok):
    straight = stream(tmp_path, tok, 1, 2)
    reference = [straight.next_batch() for _ in range(30)]  # crosses two epoch boundaries
    assert straight.cursor.taken * 2 > 2 * 50  # 60 of this rank's positions: into the third epoch of 50
    first = stream(tmp_path, tok, 1, 2)
    for _ in range(11):
        first.next_batch()
    resumed = stream(tmp_path, tok, 1, 2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for expected in reference[11:]:
        got = resumed.next_batch()
        assert got.sample_ids == expected.sample_ids
        assert got.input_ids.equal(expected.input_ids) and got.labels.equal(expected.labels)


def test_resume_refuses_other_world_or_changed_data(tmp_path, tok):
    state = stream(tmp_path, tok, 0, 2).state_dict()
    with pytest.raises(DataError, match="rank 0 of 2, this is rank 0 of 4"):
        stream(tmp_path, tok, 0, 4).load_state_dict(state)
    # The supported way: every rank's state, resharded for the new world.
    states = [stream(tmp_path, tok, r, 2).state_dict() for r in range(2)]
    stream(tmp_path, tok, 0, 4).load_state_dict(restore_states(states, 4)[0])
    with pytest.raises(DataError, match="the data changed"):
        stream(tmp_path, tok, 0, 2, records=chat_records(60)).load_state_dict(state)


def test_bad_records_name_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat_records(1)[0]) + "\n\n{not json\n")
    cfg = load_config(None, [f"data.train=[{{path: {path}, format: chat}}]", "data.shuffle=false"])
    s = TrainStream(cfg.data, tok, seed=0, rank=0, world_size=1, micro_batch_size=1, task=task_for(cfg))
    s.next_batch()
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON: Expecting property name"):
        s.next_batch()
    write_jsonl(path, [{"messages": [{"role": "user", "content": "only a question"}]}])
    s = TrainStream(cfg.data, tok, seed=0, rank=0, world_size=1, micro_batch_size=1, task=task_for(cfg))
    with pytest.raises(DataError, match=r"d\.jsonl:1: chat record has no assistant turn"):
        s.next_batch()
    with pytest.raises(DataError, match="format 'text'"):
        load = load_config(None, [f"data.train=[{{path: {path}, format: text}}]", "data.train_on=assistant"])
        TrainStream(load.data, tok, seed=0, rank=0, world_size=1, micro_batch_size=1, task=task_for(load))


def test_eval_gives_every_rank_the_same_number_of_batches(tmp_path, tok):
    path = write_jsonl(tmp_path / "e.jsonl", chat_records(5))
    cfg = load_config(None, [f"data.eval=[{{path: {path}, format: chat}}]"])
    shares = [eval_batches(cfg.data, tok, rank, 2, micro_batch_size=2, task=task_for(cfg)) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 1]  # 3 and 2 samples
    # The recipe pads every rank to the most batches any rank has, with rows that carry no loss.
    shares = [pad_eval_batches(s, 2, lambda: task_for(cfg).filler_batch(tok.pad_token_id)) for s in shares]
    assert len(shares[0]) == len(shares[1]) == 2 and shares[1][1].trained_tokens == 0
    ids = [i for share in shares for b in share for i in b.sample_ids]
    assert sorted(i.rsplit("/", 1)[-1] for i in ids) == sorted(f"e.jsonl:{n}" for n in range(1, 6))
    assert sum(b.trained_tokens for share in shares for b in share) == sum(
        tokenize_record(r, "chat", "assistant", tok).trained_tokens for r in chat_records(5))


def test_truncation_drops_samples_with_nothing_to_learn(tmp_path, tok):
    long_prompt = [{"messages": [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "x"}]}]
    short_len = len(tokenize_record(chat_records(1)[0], "chat", "assistant", tok).input_ids)
    s = stream(tmp_path, tok, 0, 1, records=long_prompt + chat_records(3), **{"data.max_seq_len": short_len})
    batches = [s.next_batch() for _ in range(3)]  # 6 samples: the long one comes up at least once
    assert all(b.input_ids.shape[1] <= short_len for b in batches)
    assert all(b.trained_tokens > 0 for b in batches)
    assert s.counters["skipped_no_trained_tokens"] >= 1 and s.counters["truncated"] >= 1
    assert not [i for b in batches for i in b.sample_ids if i.endswith("d.jsonl:1")]


def test_a_stream_with_nothing_to_learn_fails_instead_of_looping(tmp_path, tok):
    s = stream(tmp_path, tok, 0, 1, records=chat_records(4), **{"data.max_seq_len": 9})
    with pytest.raises(DataError, match=r"records in a row gave nothing to train on .*max_seq_len=9"):
        s.next_batch()


def test_prompt_completion_trains_the_completion_and_eos(tok):
    record = {"prompt": "Translate to French: cat ->", "completion": " chat"}
    sample = tokenize_record(record, "prompt_completion", "completion", tok)
    assert trained_text(tok, sample) == "chat</s>"
    assert sample.input_ids[0] == tok.bos_token_id and sample.input_ids[-1] == tok.eos_token_id
    everything = tokenize_record(record, "prompt_completion", "all", tok)
    assert everything.labels[1:] == everything.input_ids[1:]
    with pytest.raises(RecordError, match="prompt_completion field 'completion' is int, not a string"):
        tokenize_record({"prompt": "a", "completion": 3}, "prompt_completion", "completion", tok)


def test_tool_turns_are_context_and_tool_calls_are_trained(tok):
    record = {"messages": [
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "weather", "arguments": {"city": "Lima"}}]},
        {"role": "tool", "content": "18C, cloudy"},
        {"role": "assistant", "content": "It is 18C and cloudy."}]}
    sample = tokenize_record(record, "chat", "assistant", tok)
    trained = trained_text(tok, sample)
    assert '"city": "Lima"' in trained and trained.endswith("It is 18C and cloudy.</s>")
    assert "18C, cloudy" not in trained and "18C, cloudy" in tok.decode(sample.input_ids)


def test_system_prompt_and_multi_turn_masks_follow_the_turns(tok):
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                           {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                           {"role": "assistant", "content": "A2"}, {"role": "user", "content": "U3"},
                           {"role": "assistant", "content": "A3"}]}
    assert trained_text(tok, tokenize_record(record, "chat", "assistant", tok)) == "A1</s>A2</s>A3</s>"
    assert trained_text(tok, tokenize_record(record, "chat", "last_assistant", tok)) == "A3</s>"
