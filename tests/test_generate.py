"""Generation: the KV-cached path against full recomputation, sampling knobs, stopping, and the
`phitrain generate` command end to end."""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import PYTHON, random_phitrain_model, single_thread_env, tiny_config

from phitrain.checkpoint import load_checkpoint
from phitrain.model.generate import _sample, complete, generate
from phitrain.model.skinny_matmul import MAX_ROWS, SkinnyMatmulPass


pytestmark = pytest.mark.usefixtures("torch_single_thread")



def _prompts(cfg, lengths=(6, 13, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["parallel-hd80-qknorm", "sequential-gqa4"])
def test_cached_equals_uncached_on_a_padded_batch(name):
    model = random_phitrain_model(tiny_config(name), seed=11)
    prompts = _prompts(model.config)
    cached = generate(model, prompts, 24)
    uncached = generate(model, prompts, 24, use_cache=False)
    assert cached == uncached
    assert all(len(row) == 24 for row in cached)
    # each row of the padded batch is what that prompt gives alone
    assert [generate(model, [p], 24)[0] for p in prompts] == cached


@pytest.mark.parametrize("name", ["parallel-hd64", "sequential-hd80"])
def test_cached_equals_uncached_when_sampling(name):
    model = random_phitrain_model(tiny_config(name), seed=12)
    prompts = _prompts(model.config, (4, 9))
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, seed=5)
    assert generate(model, prompts, 16, **kw) == generate(model, prompts, 16, use_cache=False, **kw)


@pytest.mark.parametrize("name", ["parallel-hd80-qknorm", "sequential-gqa4"])
def test_compiled_decode_gives_the_eager_greedy_tokens(name):
    """The compiled static-cache decode step computes what the eager path does: the same greedy tokens
    on a left-padded batch (masked graph), on one unpadded prompt (unmasked graph, another batch size),
    and again on a second call that reuses the decoder's cache and graphs."""
    model = random_phitrain_model(tiny_config(name), seed=11)
    prompts = _prompts(model.config)
    eager = generate(model, prompts, 24)
    assert generate(model, prompts, 24, compile=True) == eager
    assert generate(model, prompts[1:2], 30, compile=True) == generate(model, prompts[1:2], 30)
    assert generate(model, prompts, 24, compile=True) == eager
    model.to(torch.float64)     # a model moved to another dtype gets a decoder (and cache) of its own
    assert generate(model, prompts, 24, compile=True) == generate(model, prompts, 24)
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, prompts, 4, compile=True, use_cache=False)


def test_compiled_batch_one_step_decomposes_its_matmuls_and_guards_each_call_once(monkeypatch):
    """On a CPU the batch-1 step's matmuls become inductor reductions (SkinnyMatmulPass), and only the
    first step of each generate call runs dynamo's full guards. The tokens stay the eager ones when the
    weights change between calls, and when calls alternate between models of two configurations, one
    and two rows, so that every later step must find its own graph among several."""
    from torch._inductor import config as inductor_config

    stances = []
    real_set_stance = torch.compiler.set_stance

    def recording_set_stance(*args, **kwargs):
        stances.append(kwargs.get("skip_guard_eval_unsafe", False))
        return real_set_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", recording_set_stance)
    # hidden 96: a shape no other test compiles, so inductor really runs here (no cached graph)
    a = random_phitrain_model(tiny_config("parallel-hd64", hidden_size=96, num_heads=2, rotary_dim=16), seed=3)
    b = random_phitrain_model(tiny_config("sequential-gqa4"), seed=4)
    prompt_a, prompt_b = _prompts(a.config, (7,)), _prompts(b.config, (5, 9))
    rewrites = SkinnyMatmulPass.rewrites
    before = generate(a, prompt_a, 20)
    with inductor_config.patch(fx_graph_cache=False):
        assert generate(a, prompt_a, 20, compile=True) == before
    # qkv, out, fc1, fc2 per layer and the vocabulary projection
    assert SkinnyMatmulPass.rewrites - rewrites == 4 * a.config.num_layers + 1
    assert stances == [True] * 18      # 19 decode steps after the prefill: all but the first
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(-1.5)
    assert generate(a, prompt_a, 12) != before[:12]      # so stale weights in a compiled step would show
    for model, prompts in [(b, prompt_b), (a, prompt_a), (b, prompt_b[:1]), (a, prompt_a), (b, prompt_b)]:
        stances.clear()
        assert generate(model, prompts, 12, compile=True) == generate(model, prompts, 12)
        assert stances == [True] * 10


def test_skinny_matmul_pass_rewrites_statically_shaped_cpu_matmuls_of_few_rows_only():
    """Up to MAX_ROWS fixed rows, a matmul becomes a reduction with the eager values (to rounding); more
    rows, or a dynamic row count, keep the GEMM."""
    from torch._inductor import config as inductor_config

    def linear_and_mm(x, w, b):
        return torch.nn.functional.linear(x, w, b), x @ w.t()     # aten.addmm, aten.mm

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    options = {"post_grad_custom_post_pass": SkinnyMatmulPass()}
    for rows, dynamic, rewritten in [(1, False, 2), (8, False, 2), (MAX_ROWS, False, 2),
                                     (MAX_ROWS + 1, False, 0), (4, True, 0)]:
        x = torch.randn(rows, 48, generator=g)
        if dynamic:   # the row count only (the weights' sizes are fixed)
            torch._dynamo.mark_dynamic(x, 0)
        before = SkinnyMatmulPass.rewrites
        torch._dynamo.reset()
        with inductor_config.patch(fx_graph_cache=False):
            got = torch.compile(linear_and_mm, options=options)(x, w, b)
        assert SkinnyMatmulPass.rewrites - before == rewritten, (rows, dynamic)
        for out, ref in zip(got, linear_and_mm(x, w, b)):
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compiled_cpu_step_over_a_big_cache_attends_to_its_filled_columns_with_one_graph(monkeypatch,
                                                                                        window_widths):
    """Above WINDOW_MIN_BYTES of cache each step attends over the columns written so far (a window of
    the cache, its width dynamic): the eager tokens on a padded batch, one graph for every width, and
    a window of every width from the first decode step to the last."""
    import phitrain.model.generate as generate_module

    widths = window_widths
    monkeypatch.setattr(generate_module, "WINDOW_MIN_BYTES", 0)
    model = random_phitrain_model(tiny_config("parallel-hd80-qknorm"), seed=5)
    prompts = _prompts(model.config, (6, 11))
    assert generate(model, prompts, 16, compile=True) == generate(model, prompts, 16)
    assert widths == list(range(12, 12 + 15))      # 15 decode steps after the 11-token prefill
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    widths.clear()
    shorter = _prompts(model.config, (3, 5), seed=1)    # the same cache width (64), other window widths
    assert generate(model, shorter, 20, compile=True) == generate(model, shorter, 20)
    assert widths == list(range(6, 6 + 19))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_windowed_and_full_cache_steps_of_one_model_and_batch_size_alternate_correctly(monkeypatch,
                                                                                      window_widths):
    """A cache of 128 columns is windowed, one of 64 is not: the two graphs for the same rows alternate
    between generate calls, and a window as wide as the small cache (same sizes, other strides) must
    still find its own graph when the later steps check only the guards that tell graphs apart."""
    import phitrain.model.generate as generate_module

    widths = window_widths
    model = random_phitrain_model(tiny_config("sequential-gqa4"), seed=6)
    cfg = model.config
    bytes_at_128 = 2 * cfg.num_layers * 2 * cfg.num_kv_heads * 128 * cfg.head_dim * 4
    monkeypatch.setattr(generate_module, "WINDOW_MIN_BYTES", bytes_at_128)
    long_run, short_run = (_prompts(cfg, (5, 3), seed=2), 62), (_prompts(cfg, (9, 4), seed=3), 40)
    for (prompts, new), windowed in [(long_run, True), (short_run, False), (long_run, True), (short_run, False)]:
        widths.clear()
        assert generate(model, prompts, new, compile=True) == generate(model, prompts, new)
        assert widths == (list(range(6, 6 + new - 1)) if windowed else [])


def test_sampling_is_repeatable_with_a_seed_and_top_k_1_is_greedy():
    model = random_phitrain_model(tiny_config("parallel-hd64"), seed=13)
    prompts = _prompts(model.config, (5, 8))
    a = generate(model, prompts, 20, temperature=1.5, seed=1)
    assert a == generate(model, prompts, 20, temperature=1.5, seed=1)
    assert a != generate(model, prompts, 20, temperature=1.5, seed=2)
    greedy = generate(model, prompts, 20)
    assert a != greedy
    assert generate(model, prompts, 20, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(model, prompts, 20, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log().expand(4000, 4)
    seen = set(_sample(logits, 1.0, 2, None, g).tolist())
    assert seen == {1, 3}  # the two most likely
    # nucleus: keep the smallest top set whose mass reaches top_p (0.5 + 0.3 = 0.8)
    assert set(_sample(logits, 1.0, None, 0.8, g).tolist()) == {1, 3}
    assert set(_sample(logits, 1.0, None, 0.81, g).tolist()) == {1, 3, 2}
    assert set(_sample(logits, 1.0, None, 0.4, g).tolist()) == {1}
    # temperature sharpens: at T=0.05 the top token wins essentially always
    assert set(_sample(logits, 0.05, None, None, g).tolist()) == {1}


def test_eos_and_stop_ids_end_each_row_independently():
    model = random_phitrain_model(tiny_config("sequential-gqa4"), seed=14)
    prompts = _prompts(model.config, (3, 7))
    free = generate(model, prompts, 20)
    eos = free[0][5]
    stopped = generate(model, prompts, 20, eos_id=eos)
    first = free[0].index(eos)
    assert stopped[0] == free[0][: first + 1]  # eos included, nothing after it
    if eos in free[1]:
        assert stopped[1] == free[1][: free[1].index(eos) + 1]
    else:
        assert stopped[1] == free[1]
    seq = free[1][8:10]
    by_ids = generate(model, prompts, 20, stop_ids=[seq])
    assert by_ids[1][-2:] == seq and len(by_ids[1]) <= 10


def test_generate_rejects_bad_requests():
    model = random_phitrain_model(tiny_config("parallel-hd64", max_position_embeddings=32))
    with pytest.raises(ValueError, match="context"):
        generate(model, [[1, 2, 3]], 30)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 3)


def test_complete_cuts_at_stop_strings(tiny_checkpoint):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    prompt = "def add(a, b):\n"
    [free] = complete(model, tokenizer, [prompt], 24)
    assert free == tokenizer.decode(generate(model, [tokenizer.encode(prompt)], 24, eos_id=tokenizer.eos_id)[0])
    assert len(free) >= 6
    stop = free[3:6]
    [cut] = complete(model, tokenizer, [prompt], 24, stop=[stop])
    assert cut == free[: free.find(stop)]


@pytest.mark.parametrize("flags", [[], ["--compile"]], ids=["eager", "compiled"])
def test_generate_cli_prints_only_the_completion(tiny_checkpoint, flags):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    prompt = "class Point:\n    def"
    [expected] = complete(model, tokenizer, [prompt], 12)
    cmd = [PYTHON, "-m", "phitrain", "generate", str(tiny_checkpoint), "--prompt", prompt,
           "--max-new-tokens", "12", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env=single_thread_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_generate_cli_sampling_flags(tiny_checkpoint, capsys):
    """The sampling flags reach `complete` and --seed makes them repeatable (in-process: same parser and
    handler as the console script, without paying for another interpreter start)."""
    from phitrain.cli import main

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    prompt = "for i in range(10):\n"
    argv = ["generate", str(tiny_checkpoint), "--prompt", prompt, "--max-new-tokens", "12", "--temperature",
            "1.0", "--top-k", "50", "--top-p", "0.95", "--seed", "7", "--stop", "\n\n", "--device", "cpu"]
    outs = []
    for _ in range(2):
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    [want] = complete(model, tokenizer, [prompt], 12, temperature=1.0, top_k=50, top_p=0.95, seed=7, stop=["\n\n"])
    assert outs == [want + "\n"] * 2
    assert main(["generate", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err


def test_complete_compiles_on_auto_only_when_enough_decode_steps_lie_ahead(tiny_checkpoint, monkeypatch):
    from phitrain.model import generate as gen

    model, tokenizer = load_checkpoint(tiny_checkpoint)
    eager = complete(model, tokenizer, ["def f(x):"], 8, compile="auto")   # 1 batch x 8 steps: too few
    assert model not in gen._DECODERS
    monkeypatch.setattr(gen, "AUTO_COMPILE_DECODE_STEPS", 8)
    assert complete(model, tokenizer, ["def f(x):"], 8, compile="auto") == eager
    assert model in gen._DECODERS
    with pytest.raises(ValueError, match="compile must be"):
        complete(model, tokenizer, ["x"], 2, compile="yes")
