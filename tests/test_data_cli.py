"""`ft data inspect` and data errors as a user meets them on the command line."""

import json

from tests.conftest import ft_in_process, run_ft

GOOD = {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]}


def test_inspect_marks_trained_tokens_and_reports_statistics():
    proc = ft_in_process("data", "inspect", "examples/chat-demo.yaml", "-n", "1", "--scan", "50")
    out = proc.stdout
    assert "legend: «trained tokens» masked tokens" in out
    # The assistant answer and its EOS are trained, the question is not.
    trained = [part.split("»", 1)[0] for part in out.split("«")[1:]]
    assert trained and all(t.endswith("</s>") for t in trained[1:])  # [0] is the legend
    assert "<|user|>" in out and "«<|user|>" not in out
    assert "samples scanned: 50" in out and "source builtin:chat-demo: 400 records in 1 file" in out
    assert "packing efficiency at max_seq_len 256:" in out and "length histogram" in out


def test_inspect_reports_skipped_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{broken\n" + json.dumps(GOOD) + "\n")
    proc = ft_in_process("data", "inspect", "--set", f"data.train=[{{path: {path}}}]", "--set", "data.on_error=skip",
                         "-n", "1", "--scan", "4")
    assert "skipped (malformed): " in proc.stdout and "d.jsonl:2: invalid JSON" in proc.stdout

    proc = ft_in_process("data", "inspect", "--set", f"data.train=[{{path: {path}}}]", "--set", "data.shuffle=false",
                         "-n", "1", "--scan", "4", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "d.jsonl:2: invalid JSON: Expecting property name enclosed in double quotes" in proc.stderr


def test_training_on_data_with_nothing_to_learn_stops_before_the_model_loads(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "word " * 80},
                                                     {"role": "assistant", "content": "x"}]}) + "\n"
                            for _ in range(5)))
    proc = run_ft("train", "--set", f"data.train=[{{path: {path}}}]", "--set", "data.max_seq_len=32",
                  "--set", f"output_dir={tmp_path}/run", "--set", "distributed.zero_stage=0", check=False,
                  trains=False)
    assert proc.returncode == 1
    assert "gave nothing to train on" in proc.stderr and "no trained token left: 5" in proc.stderr
    assert "Loading weights" not in proc.stdout + proc.stderr
