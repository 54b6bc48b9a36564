"""Log-likelihood tasks, perplexity, and the lm-eval adapter on a tiny random checkpoint."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from phitrain.cli import main
from phitrain.errors import PhitrainError
from phitrain.eval.loglik import evaluate_task, load_for_eval, read_task, rolling_logprob, score_continuations
from phitrain.eval.ppl import perplexity


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import inspect
    import textwrap

    from phitrain.checkpoint import save_checkpoint
    from phitrain.model.phi import PhiModel
    from phitrain.model.presets import get_preset
    from phitrain.tokenizer import train_bpe

    texts = [inspect.getsource(m) for m in (json, random, textwrap)]
    tokenizer = train_bpe(iter(texts), vocab_size=400)
    cfg = get_preset("phi-1-tiny", **{
        "vocab_size": 448, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
        "rotary_dim": 8, "max_position_embeddings": 64, "attn_pdrop": 0.0, "resid_pdrop": 0.0})
    torch.manual_seed(0)
    model = PhiModel(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "light", "storm", "paper"]
    path = tmp_path_factory.mktemp("task") / "mc.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            choices = rng.sample(words, 4)
            f.write(json.dumps({"context": f"Question {i}: which word comes next after {rng.choice(words)}?",
                                "choices": choices, "gold": rng.randrange(4)}) + "\n")
    return path


def test_scores_match_a_plain_forward(checkpoint):
    model, tok = load_for_eval(checkpoint)
    ctx, cont = "def add(a, b):", " return a + b"
    (lp, _), = score_continuations(model, tok, [(ctx, cont)])
    ids = tok.encode(ctx) + tok.encode(cont)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
    n = len(tok.encode(cont))
    expected = sum(float(logits[len(ids) - 1 - n + j, ids[len(ids) - n + j]]) for j in range(n))
    assert lp == pytest.approx(expected, abs=1e-4)
    # batching and ordering do not change a score
    many = score_continuations(model, tok, [("x", " y"), (ctx, cont), ("a much longer context " * 3, " z")],
                               batch_size=2)
    assert many[1][0] == pytest.approx(lp, abs=1e-4)
    # rolling log-prob = disjoint windows of the context (64), the first token predicted from EOS
    long = tok.encode("import os\n" * 60)[:2 * 64 + 5]
    assert len(long) == 133
    seq = [tok.eos_id] + long
    expected = 0.0
    for start in (0, 64, 128):
        end = min(start + 64, len(long))
        with torch.no_grad():
            lp = model(torch.tensor([seq[start:end]])).float().log_softmax(-1)[0]
        expected += float(lp.gather(-1, torch.tensor(seq[start + 1:end + 1])[:, None]).sum())
    assert rolling_logprob(model, long, tok.eos_id, batch_size=2) == pytest.approx(expected, abs=1e-3)


def test_loglik_cli_and_fewshot(checkpoint, task, capsys):
    assert main(["eval", "loglik", "--checkpoint", str(checkpoint), "--task", str(task), "--num-fewshot", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["questions"] == 24 and 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
    with pytest.raises(PhitrainError, match="num_fewshot"):
        model, tok = load_for_eval(checkpoint)
        evaluate_task(model, tok, read_task(task), num_fewshot=24)


def test_ppl(checkpoint, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("import os\nprint(os.getcwd())\n" * 20)
    (tmp_path / "b.py").write_text("def f(x):\n    return x * 2\n")
    assert main(["eval", "ppl", "--checkpoint", str(checkpoint), str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["documents"] == 2 and result["perplexity"] > 1
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / math.log(2) / result["bytes"])
    model, tok = load_for_eval(checkpoint)
    # a random model over ~448 tokens: perplexity near the vocabulary size, far from 1
    assert 50 < perplexity(model, tok, ["hello world " * 30])["perplexity"] < 5000


def test_bad_input(checkpoint, task, tmp_path, capsys):
    assert main(["eval", "loglik", "--checkpoint", str(tmp_path / "missing"), "--task", str(task)]) == 2
    assert "no such directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "q", "choices": ["a", "b"], "gold": 5}\n')
    assert main(["eval", "loglik", "--checkpoint", str(checkpoint), "--task", str(bad)]) == 2
    assert "'gold' must be an index" in capsys.readouterr().err
    bad.write_text('{"context": "q", "choices": ["a", "b"], "gold": 0}\n{oops\n')
    assert main(["eval", "loglik", "--checkpoint", str(checkpoint), "--task", str(bad)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["eval", "ppl", "--checkpoint", str(checkpoint), str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "humaneval", "--checkpoint", str(tmp_path / "missing"), "--limit", "1",
                 "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_humaneval_generation(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["eval", "humaneval", "--checkpoint", str(checkpoint), "--limit", "2", "--n-samples", "2",
                 "--temperature", "0.8", "--max-new-tokens", "16", "--k", "1", "2", "--out", str(out),
                 "--timeout", "5"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["samples"] == 4 and len(rows) == 4 and {"pass@1", "pass@2"} <= set(summary)
    assert all(r["status"] in ("passed", "failed", "timed out") and "error" in r for r in rows)


def test_lm_eval_adapter_matches_loglik(checkpoint, task, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    import phitrain.eval.lm_eval_adapter  # noqa: F401  (registers "phitrain")

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: phitrain_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{gold}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    out = lm_eval.simple_evaluate(model="phitrain", model_args=f"checkpoint={checkpoint}",
                                  tasks=["phitrain_tiny_mc"], num_fewshot=0,
                                  task_manager=TaskManager(include_path=str(tasks)))
    theirs = out["results"]["phitrain_tiny_mc"]
    model, tok = load_for_eval(checkpoint)
    ours = evaluate_task(model, tok, read_task(task), num_fewshot=0)
    assert theirs["acc,none"] == pytest.approx(ours["acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1  # not a degenerate all-or-nothing task
