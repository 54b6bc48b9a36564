"""`phitrain synth`: plan, generate (bounded concurrency, cached), verify, write, report.

Generators run one after another. Within one, a thread pool of `endpoint.concurrency` workers takes the
planned items; each worker sends its item's requests in order, so at most `concurrency` requests are in
flight. When all items are answered, the drafts that carry code are executed in the sandbox together, and
the kept items are written in item order — never in the order answers arrived — through a temporary file
and a rename, so `DIR/<generator>.parquet` is either absent or complete and a re-run that finds every
answer in the cache writes the same bytes of text and metadata. If a request fails for good, the workers
stop, the first error is reported as one line, and the answers received so far are already in the cache.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

from phitrain.config import dump_yaml
from phitrain.errors import PhitrainError
from phitrain.eval.sandbox import Sandbox
from phitrain.files import atomic_path, atomic_write_text
from phitrain.progress import Progress
from phitrain.synth.client import LLMClient, RequestCache
from phitrain.synth.config import (CodeReversalGenerator, LongGenerator, RewriteGenerator, SynthRecipe,
                                   TextbookGenerator, _Generator, _TopicsMixin)
from phitrain.synth.corpus import mine_topics, read_code, read_lines, read_passages
from phitrain.synth.generators import Draft, Job, run_item
from phitrain.synth.plan import Item, plan
from phitrain.synth.report import generator_report, write_report

VERIFIED_KINDS = ("exercises", "code_reversal")


def axis_values(gen: _Generator, where: str) -> tuple[dict[str, list[str]], dict]:
    """The values of every axis the generator's templates use (and the code items behind `code`)."""
    values: dict[str, list[str]] = {"template": [str(i) for i in range(len(gen.main_templates()))]}
    code_items = {}
    for axis in gen.axis_names():
        if axis == "topic":
            assert isinstance(gen, _TopicsMixin)
            found = list(gen.topics)
            if gen.topics_file:
                found += read_lines(gen.topics_file, f"{where}.topics_file")
            if gen.topics_from is not None:
                found += mine_topics(gen.topics_from, f"{where}.topics_from")
            values[axis] = list(dict.fromkeys(found))
        elif axis == "seed":
            assert isinstance(gen, (TextbookGenerator, RewriteGenerator)) and gen.seeds is not None
            values[axis] = read_passages(gen.seeds, f"{where}.seeds")
        elif axis == "code":
            assert isinstance(gen, CodeReversalGenerator)
            code_items = {c.code: c for c in read_code(gen.code, f"{where}.code")}
            values[axis] = list(code_items)
        elif axis in gen.variables:
            values[axis] = list(gen.variables[axis])
        else:   # audience, style, function_name, format: one list field each
            (field_name,) = gen.own_axes()[axis]
            values[axis] = list(getattr(gen, field_name))
    return values, code_items


def build_job(recipe: SynthRecipe, index: int) -> Job:
    gen = recipe.generators[index]
    where = f"generators.{index} ({gen.name})"
    values, code_items = axis_values(gen, where)
    sampling = recipe.sampling_for(gen)
    items = plan(gen.name, sampling.seed, {axis: len(v) for axis, v in values.items()}, gen.n)
    count_tokens = None
    if isinstance(gen, LongGenerator):
        from phitrain.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(gen.tokenizer)
        except PhitrainError as err:
            raise PhitrainError(f"{where}.tokenizer: {err}") from None
        count_tokens = lambda text: len(tokenizer.encode(text))  # noqa: E731
    return Job(gen=gen, values=values, items=items, sampling=sampling, code_items=code_items,
               count_tokens=count_tokens)


def generate(job: Job, client: LLMClient, concurrency: int, advance: Callable[[], None]) -> list[Draft]:
    """Every item of the job through a pool of `concurrency` threads; drafts in item order."""
    drafts: list[Draft | None] = [None] * len(job.items)

    def work(item: Item) -> Draft:
        try:
            return run_item(job, item, client)
        except BaseException:
            client.abort.set()     # before this thread takes another item: no request after a fatal error
            raise

    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"synth-{job.gen.name}")
    try:
        futures = {pool.submit(work, item): item.index for item in job.items}
        for future in as_completed(futures):
            drafts[futures[future]] = future.result()
            advance()
    except BaseException:
        client.abort.set()     # workers stop at their next request or backoff; in-flight answers are cached
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [d for d in drafts if d is not None]


def verify(drafts: list[Draft], sandbox: Sandbox) -> None:
    """Run every draft's program against its tests; a draft that does not pass is rejected."""
    todo = [d for d in drafts if d.program is not None]
    if not todo:
        return
    results = sandbox.run([d.program for d in todo])
    for d, res in zip(todo, results):
        d.verification = "passed" if res.passed else f"{res.status}: {res.error}"
        if not res.passed:
            d.reject(f"tests {res.status}: {res.error}")


def record(job: Job, draft: Draft, model: str) -> dict[str, Any]:
    """One output row: `id`, `text` and metadata columns (`variables` and `sampling` are maps, the rest
    plain values), which any Parquet/JSONL reader — DataTrove's puts them in `Document.metadata` — carries
    along."""
    item = job.items[draft.index]
    sampling = job.sampling.model_dump(exclude={"stop"} if not job.sampling.stop else set())
    row: dict[str, Any] = {
        "id": f"{job.gen.name}-{draft.index:06d}", "text": draft.text, "kind": job.gen.kind,
        "generator": job.gen.name, "template": item.value_index("template"), "variables": job.variables(item),
        "seed": item.seed, "model": model, "sampling": sampling, "verification": draft.verification,
        "requests": draft.requests, "prompt_tokens": draft.prompt_tokens, "completion_tokens": draft.completion_tokens,
        "truncated": draft.truncated,
    }
    if job.gen.revise is not None:
        row["critiques"] = draft.critiques
    row.update(draft.fields)
    return row


def write_records(path: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    """All rows to `path` at once (temporary file + rename)."""
    if fmt == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.string()),
                                                              "text": pa.array([], pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def run_synth(recipe: SynthRecipe, out_dir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Run every generator of the recipe into `out_dir`; returns the report's summary."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PhitrainError(f"--out {out}: exists and is not a directory")
    jobs = [build_job(recipe, i) for i in range(len(recipe.generators))]   # every input read before any request
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(recipe, out / "recipe.yaml")
    cache = RequestCache(recipe.cache or out / "cache.sqlite")
    client = LLMClient(recipe.endpoint, cache)
    sandbox = Sandbox(recipe.sandbox) if any(j.gen.kind in VERIFIED_KINDS for j in jobs) else None
    start = time.perf_counter()
    generators: dict[str, Any] = {}
    try:
        for job in jobs:
            gen = job.gen
            before = client.counters.snapshot()
            with Progress(f"{gen.name} ({gen.kind})", len(job.items), enabled=progress) as bar:
                drafts = generate(job, client, recipe.endpoint.concurrency, bar.advance)
            if sandbox is not None:
                verify(drafts, sandbox)
            kept = [record(job, d, recipe.endpoint.model) for d in drafts if d.kept]
            rejected = [{**record(job, d, recipe.endpoint.model), "reason": d.reason} for d in drafts if not d.kept]
            write_records(out / f"{gen.name}.{recipe.output.format}", kept, recipe.output.format)
            rejected_path = out / "rejected" / f"{gen.name}.jsonl"
            if rejected:
                write_records(rejected_path, rejected, "jsonl")
            else:
                rejected_path.unlink(missing_ok=True)
            after = client.counters.snapshot()
            checked = [d for d in drafts if d.verification is not None]
            verified = ((len(checked), sum(1 for d in checked if d.kept))
                        if gen.kind in VERIFIED_KINDS else None)
            generators[gen.name] = generator_report(
                gen.name, gen.kind, gen.n, kept, rejected, verified,
                {a: v for a, v in job.values.items()}, [job.variables(i) for i in job.items],
                {k: after[k] - before[k] for k in after}, recipe.report)
    finally:
        client.close()
        cache.close()
    summary = {"recipe": recipe.name, "model": recipe.endpoint.model, "endpoint": recipe.endpoint.base_url,
               "api": recipe.endpoint.api, "cache": str(cache.path), "seconds": round(time.perf_counter() - start, 3),
               "totals": client.counters.snapshot(), "generators": generators}
    write_report(out, summary)
    return summary


def print_summary(summary: dict[str, Any], out_dir: str | os.PathLike) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"phitrain synth: {summary['recipe']}")
    for col in ("generator", "kind", "kept", "rejected", "pass rate", "distinct-2", "near-dup", "sent", "cached"):
        table.add_column(col, justify="left" if col in ("generator", "kind") else "right")
    for name, g in summary["generators"].items():
        pr = g["verification"]["pass_rate"] if g["verification"] else None
        table.add_row(name, g["kind"], f"{g['kept']}/{g['requested']}", str(g["rejected"]),
                      "–" if pr is None else f"{pr:.2f}", str(g["distinct_n"]["2"]),
                      str(g["minhash_duplicate_rate"]), str(g["requests"]["sent"]), str(g["requests"]["cache_hits"]))
    t = summary["totals"]
    Console().print(table)
    print(f"requests sent {t['sent']} (cache hits {t['cache_hits']}, retries {t['retries']}); tokens: prompt "
          f"{t['prompt_tokens']}, completion {t['completion_tokens']}; wrote {out_dir}/report.md")
