"""Every source type reads the same records, in blocks, with the right file:line / file:row locations."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ftcore.config import load_config
from ftcore.data import sources
from ftcore.data.sources import DelimitedSource, SourceError, expand, open_file
from ftcore.data.stream import DataError, SourceGroup
from ftcore.tasks import task_for


def records(n, start=0):
    return [{"text": f"record number {i} " + "x" * (i % 7)} for i in range(start, start + n)]


def jsonl_bytes(recs, blank_every=0):
    lines = []
    for i, r in enumerate(recs):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == 0:
            lines.append("")
    return ("\n".join(lines) + "\n").encode()


def read_all(source):
    return [r for b in range(len(source.counts)) for r in source.read_block(b)]


def group(tmp_path, path, fmt="text", **extra):
    over = [f"data.train=[{{path: '{path}', format: {fmt}{''.join(f', {k}: {v}' for k, v in extra.items())}}}]"]
    cfg = load_config(None, over)
    return SourceGroup(cfg.data.train[0], cfg.data, 0, seed=0)


def test_a_broken_line_in_a_text_format_jsonl_is_an_error_not_text(tmp_path):
    """format text on JSONL reads the 'text' field; a line that is not JSON must not be trained on as raw text."""
    from transformers import AutoTokenizer

    from ftcore.builtin import resolve_model_path
    from ftcore.data.stream import TrainStream

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\nthis is not json\n')
    cfg = load_config(None, [f"data.train=[{{path: '{path}', format: text}}]", "data.shuffle=false"])
    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    s = TrainStream(cfg.data, tok, seed=0, rank=0, world_size=1, micro_batch_size=2, task=task_for(cfg))
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        s.next_batch()


def test_jsonl_blocks_keep_line_numbers_across_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(records(300), blank_every=10))
    source = DelimitedSource(path, "line", block_bytes=500)
    assert len(source.counts) > 10 and len(source) == 300
    got = read_all(source)
    assert [json.loads(r.value) for r in got] == records(300)
    lines = path.read_text().split("\n")
    for r in got[::37]:  # the location is the real line in the file
        line_no = int(r.where.rsplit(":", 1)[1])
        assert json.loads(lines[line_no - 1]) == json.loads(r.value)


def test_gzip_reads_any_block_from_a_snapshot(tmp_path):
    recs = records(2000)
    plain, packed = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"
    plain.write_bytes(jsonl_bytes(recs))
    # Two gzip members (as concatenated or bgzip files are), and small snapshots/blocks to exercise seeking.
    data = jsonl_bytes(recs)
    half = data.index(b"\n", len(data) // 2) + 1
    packed.write_bytes(gzip.compress(data[:half]) + gzip.compress(data[half:]))
    a = DelimitedSource(plain, "line", block_bytes=2000)
    b = DelimitedSource(packed, "line", block_bytes=2000, snapshot_every=5000)
    assert len(b.snapshots) > 5 and list(a.counts) == list(b.counts)
    for block in (len(b.counts) - 1, 0, len(b.counts) // 2, 7):  # out of order, as a shuffled epoch reads them
        assert [r.value for r in a.read_block(block)] == [r.value for r in b.read_block(block)]
        assert [r.where.rsplit(":", 1)[1] for r in a.read_block(block)] == \
            [r.where.rsplit(":", 1)[1] for r in b.read_block(block)]


def test_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(records(500)))[:-200])
    with pytest.raises(SourceError, match="broken.jsonl.gz: truncated gzip file"):
        DelimitedSource(path, "line")


def test_parquet_row_groups_are_blocks(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(records(250)), path, row_group_size=64)
    source = open_file(path, "text", "document", "train")
    assert list(source.counts) == [64, 64, 64, 58]
    got = read_all(source)
    assert [r.value for r in got] == records(250)
    assert got[130].where.endswith("d.parquet:row 130")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(records(2500)).save_to_disk(str(tmp_path / "ds"), num_shards=3)
    source = open_file(tmp_path / "ds", "text", "document", "train")
    assert len(source) == 2500 and len(source.counts) == 3  # 1024-row blocks over the memory-mapped shards
    assert [r.value for r in read_all(source)] == records(2500)

    datasets.DatasetDict({"train": datasets.Dataset.from_list(records(5)),
                          "test": datasets.Dataset.from_list(records(3, 100))}).save_to_disk(str(tmp_path / "dd"))
    test_split = open_file(tmp_path / "dd", "text", "document", "test")
    assert [r.value for r in read_all(test_split)] == records(3, 100)
    assert read_all(test_split)[1].where.endswith("dd[test]:row 1")
    with pytest.raises(SourceError, match=r"no split 'validation' \(has train, test\)"):
        open_file(tmp_path / "dd", "text", "document", "validation")
    # Through the config, as a user writes it.
    g = group(tmp_path, tmp_path / "dd", split="test")
    assert len(g) == 3


def test_plain_text_units(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nstill first.\n\n\nSecond one.\n\nThird\n")
    assert [r.value for r in read_all(open_file(path, "text", "document", "train"))] == [path.read_bytes()]
    paragraphs = read_all(open_file(path, "text", "paragraph", "train"))
    assert [r.value for r in paragraphs] == [b"First paragraph,\nstill first.", b"Second one.", b"Third"]
    assert [r.where.rsplit(":", 1)[1] for r in paragraphs] == ["1", "5", "7"]
    lines = read_all(open_file(path, "text", "line", "train"))
    assert [r.value for r in lines] == [b"First paragraph,", b"still first.", b"Second one.", b"Third"]


def test_directories_and_globs_expand_in_sorted_order(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for name, recs in (("b.jsonl", records(3)), ("a.jsonl.gz", records(2, 10)), ("sub/c.jsonl", records(4, 20))):
        data = jsonl_bytes(recs)
        (tmp_path / "corpus" / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    (tmp_path / "corpus" / "notes.csv").write_text("ignored,by,type\n")
    files = expand(str(tmp_path / "corpus"))
    assert [f.name for f in files] == ["a.jsonl.gz", "b.jsonl", "c.jsonl"]
    assert [f.name for f in expand(str(tmp_path / "corpus" / "*.jsonl*"))] == ["a.jsonl.gz", "b.jsonl"]
    assert [f.name for f in expand(str(tmp_path / "corpus" / "**" / "*.jsonl"))] == ["b.jsonl", "c.jsonl"]
    g = group(tmp_path, tmp_path / "corpus")
    assert len(g) == 9 and len(g.files) == 3
    with pytest.raises(SourceError, match="the pattern matches no file"):
        expand(str(tmp_path / "corpus" / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no .jsonl, .parquet or .txt file"):
        expand(str(tmp_path / "empty"))


@pytest.mark.parametrize("name, content, fmt, message", [
    ("arr.json", b'[{"text": "a"}]', "text", r"arr.json: a JSON array, not JSON Lines; convert it with `jq"),
    ("d.csv", b"a,b\n", "text", r"d.csv: unknown file type"),
    ("book.txt", b"hello", "chat", r"book.txt: a plain text file can only be format text, not chat"),
    ("empty.jsonl", b"\n\n", "chat", r"empty.jsonl: no records \(empty source\)"),
    ("missing.jsonl", None, "chat", r"missing.jsonl: does not exist"),
])
def test_unusable_sources_fail_with_the_path(tmp_path, name, content, fmt, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        group(tmp_path, tmp_path / name, fmt=fmt)


def test_block_reads_stay_bounded(tmp_path, monkeypatch):
    """A stream keeps one shuffle window of blocks in memory, whatever the corpus size."""
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(records(3000)))
    g = group(tmp_path, path)
    for draw in range(0, 3000, 3):
        _, block, offset = g.order.locate(draw)
        g.record(block, offset)
    assert len(g.files[0].counts) > 50
    assert len(g._blocks) <= sources_window() + 1


def sources_window():
    from ftcore.data.order import WINDOW_BLOCKS

    return WINDOW_BLOCKS
