"""`phitrain serve`: the batching engine driven step by step in-process, then the real server as a
subprocess on 127.0.0.1 answering the official `openai` client.

Expected texts come from `phitrain.model.generate` run on the same checkpoint one prompt at a time, so
every check compares the server (batched, streamed, joined mid-flight) against the plain generator.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import PYTHON, single_thread_env

from phitrain.checkpoint import load_checkpoint
from phitrain.cli import main
from phitrain.model.generate import complete, generate
from phitrain.serve.engine import BatchEngine, SamplingParams, Sequence, streamable
from phitrain.serve.protocol import CHAT_END, ChatMessage, render_chat

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def expected(loaded, prompt: str, max_tokens: int, **kw) -> str:
    """What the plain generator gives for one prompt alone (`phitrain generate`'s function)."""
    model, tokenizer = loaded
    return complete(model, tokenizer, [prompt], max_tokens, **kw)[0]


# ---- the engine, in-process ------------------------------------------------------------------------

class Collector:
    """A sequence's events: text chunks in order, and how it ended."""

    def __init__(self):
        self.chunks, self.finish, self.tokens = [], None, 0

    def __call__(self, event):
        assert self.finish is None, "event after the last one"
        self.chunks.append(event.text)
        if event.finish_reason:
            self.finish, self.tokens = event.finish_reason, event.completion_tokens

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_rows_join_and_leave_a_running_batch_and_compute_what_they_would_alone(loaded, compile):
    """Rows admitted mid-generation with prompts longer and shorter than the running batch's cache,
    greedy and seeded-sampled rows in one batch, a cancelled row: each finished row equals generate().
    Compiled, the decode step runs as one graph over batches whose rows and widths keep changing."""
    model, tokenizer = loaded
    eos = tokenizer.eos_id
    engine = BatchEngine(model, tokenizer, max_batch_size=3, compile=compile)
    prompts = {"a": [5, 9, 11], "b": list(range(20, 60)), "c": [7], "d": [3, 4, 5, 6], "e": [8, 8]}
    params = {"a": SamplingParams(40, ignore_eos=True),
              "b": SamplingParams(12, temperature=1.0, top_k=40, seed=11, ignore_eos=True),
              "c": SamplingParams(25, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True),
              "d": SamplingParams(30, ignore_eos=True),
              "e": SamplingParams(10, ignore_eos=True)}
    events = {k: Collector() for k in prompts}
    seqs = {k: Sequence(prompts[k], params[k], events[k], stream=True) for k in prompts}

    def run(steps):
        for _ in range(steps):
            engine.step()

    engine.add(seqs["a"])
    run(3)  # a alone, its cache 5 positions wide
    engine.add(seqs["b"])  # a 40-token prompt: the running row is shifted right
    run(2)
    engine.add(seqs["c"])  # a 1-token prompt into a 42-wide cache
    engine.add(seqs["d"])  # over max_batch_size: waits for a free row
    run(2)
    assert len(engine.rows) == 3 and engine.waiting == [seqs["d"]]
    seqs["c"].cancelled = True  # the client went away: d takes its row
    engine.add(seqs["e"])
    while engine.busy:
        engine.step()

    for k in "abde":
        p = params[k]
        [want] = generate(model, [prompts[k]], p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                          top_p=p.top_p, seed=p.seed)
        assert seqs[k].generated == want, k
        assert events[k].text == tokenizer.decode([t for t in want if t != eos]), k
        assert (events[k].finish, events[k].tokens) == ("length", p.max_tokens)
    assert events["c"].finish is None and 0 < len(seqs["c"].generated) < 25
    stats = engine.stats
    assert stats.max_batch_size == 3 and stats.joined_running == 4  # b, c, d, e joined running rows
    assert stats.completion_tokens == 40 + 12 + 30 + 10 + len(seqs["c"].generated)
    assert engine.cache is None and engine.rows == []


def test_compiled_cpu_engine_pads_its_rows_to_graphs_of_fixed_row_counts(loaded, window_widths, monkeypatch):
    """Six rows finishing one by one, padding up to 4 rows: above the bound the decode step runs the
    graph for any row count (the GEMM), then graphs for 4, 2 and 1 rows with SkinnyMatmulPass, 3 rows
    padded to 4; each step over the filled columns of the cache only; every row equals generate()."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._inductor import config as inductor_config

    import phitrain.model.generate as generate_module
    from phitrain.model.skinny_matmul import SkinnyMatmulPass

    monkeypatch.setattr(generate_module, "PADDED_ROWS_MAX", 4)
    model, tokenizer = loaded
    n = 6
    engine = BatchEngine(model, tokenizer, max_batch_size=n, compile=True)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(1 + i % 4)] for i in range(n)]
    seqs = [Sequence(p, SamplingParams(3 + i, ignore_eos=True), Collector(), stream=False)
            for i, p in enumerate(prompts)]
    for seq in seqs:
        engine.add(seq)
    filled, shapes, decode = [], [], engine._decode

    def recording_decode():    # the columns each decode step may attend to, and its (rows, cache rows)
        filled.append(engine.cache.length + 1)
        if not shapes or shapes[-1] != (len(engine.rows), len(engine.cache.k[0])):
            shapes.append((len(engine.rows), len(engine.cache.k[0])))
        decode()

    engine._decode = recording_decode
    torch._dynamo.reset()     # no graphs from earlier tests: each one this test needs is compiled here
    rewrites = SkinnyMatmulPass.rewrites
    with inductor_config.patch(fx_graph_cache=False):    # so that the pass really runs
        while engine.busy:
            engine.step()
    for i, seq in enumerate(seqs):
        assert seq.generated == generate(model, [prompts[i]], 3 + i)[0], i
    assert window_widths == filled and len(filled) == (3 + n - 1) - 1   # the first token is the prefill's
    assert shapes == [(6, 6), (5, 5), (4, 4), (3, 4), (2, 2), (1, 1)]
    # two steps of 6 rows, one of each fewer; real rows only (3 rows padded to 4 count 3)
    assert engine.stats.max_batch_size == n and engine.stats.batch_rows == n + sum(range(1, n + 1))
    # the fixed row counts' graphs (4, 2, 1) rewrite every matmul, the graph for any row count none
    fixed_graphs = _debug_get_cache_entry_list(generate_module._decode_logits_any_width.__code__)
    gemm_graphs = _debug_get_cache_entry_list(generate_module._decode_logits_any_shape.__code__)
    assert (len(fixed_graphs), len(gemm_graphs)) == (3, 1)
    assert SkinnyMatmulPass.rewrites - rewrites == len(fixed_graphs) * (4 * model.config.num_layers + 1)
    # rows that need no padding (equal prompts, admitted together) run the same graphs as padded ones
    aligned = [Sequence([5, 6, 7], SamplingParams(4, ignore_eos=True), Collector(), stream=False)
               for _ in range(2)]
    for seq in aligned:
        engine.add(seq)
    engine.step()
    assert not engine.padded and len(engine.rows) == 2
    while engine.busy:
        engine.step()
    assert [s.generated for s in aligned] == generate(model, [[5, 6, 7]] * 2, 4)
    assert len(_debug_get_cache_entry_list(generate_module._decode_logits_any_width.__code__)) == 3


def test_eos_and_stop_strings_end_a_row_like_complete(loaded):
    model, tokenizer = loaded
    engine = BatchEngine(model, tokenizer, max_batch_size=4)
    prompt = "def add(a, b):\n"
    free = expected(loaded, prompt, 40)
    stop = free[5:8]
    got = {}
    for name, p, stream in [("free", SamplingParams(40), False), ("stop", SamplingParams(40, stop=(stop,)), True)]:
        got[name] = Collector()
        engine.add(Sequence(tokenizer.encode(prompt), p, got[name], stream))
    while engine.busy:
        engine.step()
    assert got["free"].text == free and len(got["free"].chunks) == 1  # not streamed: one event
    assert got["stop"].text == expected(loaded, prompt, 40, stop=[stop]) == free[:free.find(stop)]
    assert got["stop"].finish == "stop"
    # a row that meets <|endoftext|> ends there with finish_reason "stop", eos not in the text
    eos_prompt = tokenizer.encode(prompt) + generate(model, [tokenizer.encode(prompt)], 3)[0]
    forced = Collector()
    seq = Sequence(eos_prompt, SamplingParams(30), forced)
    engine.add(seq)
    engine.eos_id = generate(model, [eos_prompt], 4)[0][3]  # pretend the 4th greedy token is eos
    while engine.busy:
        engine.step()
    assert forced.finish == "stop" and len(seq.generated) <= 4 and seq.generated[-1] == engine.eos_id


def test_streamable_holds_back_partial_characters_and_stop_prefixes():
    assert streamable("abc", ()) == 3
    assert streamable("ab\ufffd", ()) == 2
    assert streamable("x = 1\n\n", ["\n\n\n"]) == 5
    assert streamable("x = 1\nd", ["\ndef"]) == 5
    assert streamable("x = 1\nd", ["zz", "\nde"]) == 5
    assert streamable("x = 1", ["\ndef"]) == 5


def test_chat_template_is_phi4s_format():
    msgs = [ChatMessage(role="developer", content="Be brief."),
            ChatMessage(role="user", content=[{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}])]
    assert render_chat(msgs) == ("<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
                                 "<|im_start|>user<|im_sep|>Hi!<|im_end|><|im_start|>assistant<|im_sep|>")


# ---- the server, as a subprocess -------------------------------------------------------------------

class Server:
    """`python -m phitrain serve ... --port 0` with its output read on a thread."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([PYTHON, "-m", "phitrain", "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=single_thread_env())
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no URL from phitrain serve: {self.output}") from None
            match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if match:
                self.root = match.group(1)
                self.url = self.root + "/v1"
                return

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def stats(self) -> dict:
        return httpx.get(self.root + "/stats").json()

    def stop(self, sig=signal.SIGINT) -> str:
        self.proc.send_signal(sig)
        assert self.proc.wait(timeout=60) == 0, self.output
        time.sleep(0.1)  # let the reader thread take the last line
        return "".join(self.output)


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    srv = Server(str(tiny_checkpoint), "--max-batch-size", "8")
    yield srv
    out = srv.stop(signal.SIGINT)
    assert "phitrain serve: stopped" in out and "Traceback" not in out


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def test_models_endpoint(client, tiny_checkpoint):
    [card] = client.models.list().data
    assert card.id == str(tiny_checkpoint) and card.owned_by == "phitrain"
    assert client.models.retrieve(str(tiny_checkpoint)).id == card.id
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_greedy_completion_equals_phitrain_generate(client, server, tiny_checkpoint, loaded):
    prompt = "class Point:\n    def"
    cli = subprocess.run([PYTHON, "-m", "phitrain", "generate", str(tiny_checkpoint), "--prompt", prompt,
                          "--max-new-tokens", "24"], capture_output=True, text=True, timeout=120,
                         env=single_thread_env())
    assert cli.returncode == 0, cli.stderr
    r = client.completions.create(model=str(tiny_checkpoint), prompt=prompt, max_tokens=24, temperature=0)
    [choice] = r.choices
    assert choice.text + "\n" == cli.stdout
    assert r.usage.prompt_tokens == len(loaded[1].encode(prompt))
    assert r.usage.completion_tokens == 24 if choice.finish_reason == "length" else choice.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_prompt_lists_token_ids_stop_and_seeds(client, tiny_checkpoint, loaded):
    model = str(tiny_checkpoint)
    prompts = ["def add(a, b):\n", "for i in range(10):\n"]
    frees = [expected(loaded, p, 30) for p in prompts]
    stop = frees[0][4:7]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=30, temperature=0, stop=[stop])
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == frees[0][:frees[0].find(stop)] and r.choices[0].finish_reason == "stop"
    assert r.choices[1].text == expected(loaded, prompts[1], 30, stop=[stop])
    ids = loaded[1].encode(prompts[1])
    assert client.completions.create(model=model, prompt=ids, max_tokens=30, temperature=0,
                                     stop=stop).choices[0].text == r.choices[1].text
    # a seeded sample is what `phitrain generate --seed` draws, and repeatable
    kw = dict(temperature=1.0, top_p=0.95, seed=7)
    sampled = [client.completions.create(model=model, prompt=prompts[0], max_tokens=20, extra_body={"top_k": 50},
                                         **kw).choices[0].text for _ in range(2)]
    assert sampled == [expected(loaded, prompts[0], 20, top_k=50, **kw)] * 2


def test_streaming_chunks_concatenate_to_the_full_text(client, tiny_checkpoint, loaded):
    model, prompt = str(tiny_checkpoint), "def add(a, b):\n"
    full = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    stop = full.choices[0].text[10:13]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == expected(loaded, prompt, 40, stop=[stop])


def test_chat_completion_is_the_template_completed(client, tiny_checkpoint, loaded):
    model = str(tiny_checkpoint)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add two numbers."}]
    rendered = render_chat([ChatMessage(**m) for m in messages])
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0)
    [choice] = r.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected(loaded, rendered, 30, stop=[CHAT_END])
    assert r.usage.prompt_tokens == len(loaded[1].encode(rendered))
    stream = list(client.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == choice.message.content
    assert stream[-1].choices[0].finish_reason == choice.finish_reason


def test_concurrent_requests_are_batched_and_each_is_right(client, server, tiny_checkpoint, loaded):
    model = str(tiny_checkpoint)
    jobs = [(f"def f{i}(x):\n    return x" + " + 1" * i, 24 + 4 * i, dict(temperature=0) if i % 2 else
             dict(temperature=0.9, top_k=30, seed=100 + i)) for i in range(8)]
    before = server.stats()
    barrier = threading.Barrier(len(jobs))

    def ask(job):
        prompt, n, kw = job
        top_k = kw.pop("top_k", None)
        barrier.wait()
        return client.completions.create(model=model, prompt=prompt, max_tokens=n, **kw,
                                         extra_body={"top_k": top_k, "ignore_eos": True}).choices[0]

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, [(p, n, dict(kw)) for p, n, kw in jobs]))
    model_, tokenizer = loaded
    for (prompt, n, kw), answer in zip(jobs, answers):
        [want] = generate(model_, [tokenizer.encode(prompt)], n, **kw)  # alone, no eos stop (ignore_eos)
        assert answer.text == tokenizer.decode([t for t in want if t != tokenizer.eos_id])
        assert answer.finish_reason == "length"
    after = server.stats()
    assert after["requests"]["/v1/completions"] - before["requests"].get("/v1/completions", 0) == 8
    assert after["max_batch_size"] > 1 and after["batches"] > before["batches"]
    assert after["completion_tokens"] - before["completion_tokens"] == sum(n for _, n, _ in jobs)


@pytest.mark.parametrize("kwargs, status, message", [
    (dict(temperature=5), 400, "temperature: Input should be less than or equal to 2"),
    (dict(max_tokens=300), 400, "maximum context length is 256 tokens"),
    (dict(n=2), 400, "only n=1 is supported"),
    (dict(seed=2**70), 400, "seed: Input should be less than or equal to"),
    (dict(logprobs=2), 400, "logprobs are not supported"),
    (dict(extra_body={"top_k": 0}), 400, "top_k must be >= 1"),
    (dict(extra_body={"best_of_n": 3}), 400, "unsupported parameter 'best_of_n'"),
    (dict(prompt=[]), 400, "the prompt list is empty"),
    (dict(prompt=[1, 2, 100000]), 400, "token id 100000 is outside the vocabulary"),
    (dict(model="gpt-4"), 404, "the model 'gpt-4' does not exist"),
])
def test_bad_completion_requests_get_openai_errors(client, tiny_checkpoint, kwargs, status, message):
    request = {"model": str(tiny_checkpoint), "prompt": "x", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**request)
    assert err.value.status_code == status
    assert message in err.value.body["message"] and err.value.body["type"] == "invalid_request_error"


def test_bad_chat_and_raw_requests(client, server, tiny_checkpoint):
    model = str(tiny_checkpoint)
    with pytest.raises(openai.BadRequestError, match="messages: List should have at least 1 item"):
        client.chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.BadRequestError, match="messages.0.role: Input should be"):
        client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only text content parts are supported, got image_url"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'tools'"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    r = httpx.post(server.url + "/completions", content=b'{"model": "x", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/completions", json={"model": model})
    assert r.status_code == 400 and r.json()["error"]["message"] == "missing required parameter 'prompt'"
    r = httpx.get(server.url + "/engines")
    assert r.status_code == 404 and r.json()["error"]["message"] == "GET /v1/engines: Not Found"
    assert server.stats()["rejected"]["/v1/completions"] >= 2


def test_serves_a_transformers_directory_and_stops_on_sigterm(tmp_path, tiny_checkpoint, loaded):
    assert main(["convert", "to-hf", str(tiny_checkpoint), str(tmp_path / "hf")]) == 0
    srv = Server(str(tmp_path / "hf"), "--model-name", "tiny-hf")
    try:
        hf = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in hf.models.list().data] == ["tiny-hf"]
        prompt = "for i in range(10):\n"
        text = hf.completions.create(model="tiny-hf", prompt=prompt, max_tokens=20, temperature=0).choices[0].text
        assert text == expected(loaded, prompt, 20)
    finally:
        out = srv.stop(signal.SIGTERM)
    assert out.rstrip().endswith("phitrain serve: stopped")


def test_cli_errors_are_one_line(tmp_path, capsys, tiny_checkpoint):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: directory does not exist\n"
    assert main(["serve", str(tmp_path)]) == 2
    assert "neither a phitrain checkpoint" in capsys.readouterr().err
    assert main(["serve", str(tiny_checkpoint), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["serve", str(tiny_checkpoint), "--device", "tpu"]) == 2
    assert "--device tpu" in capsys.readouterr().err
