"""Filtered web data (Phi-4 §2: filtered web pages are the largest pretraining source, Table 5).

A `web` source's pages go through DataTrove's own steps: trafilatura main-text extraction (navigation,
menus and footers removed), then a language filter, then the Gopher quality and repetition rules (Rae et
al. 2021) and FineWeb's line-level rules, before the same dedup, quality classifier and decontamination
as every other source. Language identification uses py3langid (its model ships inside the package);
DataTrove's own `LanguageFilter` downloads a fastText model at run time, which offline machines cannot.
"""

from __future__ import annotations

import re

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters.base_filter import BaseFilter

from phitrain.config import DataSourceConfig, WebConfig
from phitrain.data.accounting import Accounting
from phitrain.errors import PhitrainError


class LanguageFilter(BaseFilter):
    """Keep documents whose most probable language (py3langid, normalised probabilities) is in
    `languages` with probability at least `threshold`; the language goes into the metadata."""

    name = "🌍 language"

    def __init__(self, languages: list[str], threshold: float):
        super().__init__()
        self.languages, self.threshold = set(languages), threshold
        self._identifier = None

    def filter(self, doc):
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            load = getattr(LanguageIdentifier, "from_model_file", None) or LanguageIdentifier.from_pickled_model
            self._identifier = load(MODEL_FILE, norm_probs=True)   # py3langid >= 0.4 / 0.3
        lang, prob = self._identifier.classify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(float(prob), 4)
        if lang not in self.languages:
            return False, "language"
        return (True, None) if prob >= self.threshold else (False, "language_score")


_LINK = re.compile(r"!?\[((?:[^\[\]]|\\[\[\]])*)\]\(([^()\s]*(?:\([^()\s]*\))?[^()\s]*)\)")
_TABLE_RULE = re.compile(r"^[\s|:\-]*$")
_ESCAPED = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|<>])")


def clean_main_text(markdown: str, max_link_density: float = 0.5) -> str:
    """Plain text from trafilatura's markdown (links kept, so navigation can be recognised): a line whose
    characters are mostly link text is navigation (link density, the signal of jusText and boilerpipe:
    menus, breadcrumbs, "related topics" lists, index bars) and is dropped; table rules and empty cells
    go; links, emphasis, code fences and escapes become their plain text."""
    out = []
    for line in markdown.splitlines():
        if _TABLE_RULE.match(line):
            continue
        linked = sum(len(m.group(1)) for m in _LINK.finditer(line))
        plain = _LINK.sub(lambda m: m.group(1), line)
        cells = [c.strip() for c in plain.split(" | ")] if "|" in plain else [plain]
        plain = " ".join(c.strip("| ").strip() for c in cells if c.strip("| ").strip())
        plain = _ESCAPED.sub(r"\1", plain.replace("**", "").replace("```", "")).strip()
        if not plain or (linked and linked >= max_link_density * len(plain.replace(" ", ""))):
            continue
        out.append(plain)
    return "\n".join(out)


class MainText(Trafilatura):
    """DataTrove's trafilatura extractor, asked for markdown with links, then `clean_main_text`."""

    name = "⛏ main text"

    def extract(self, text: str) -> str:
        return clean_main_text(super().extract(text) or "")


def web_steps(cfg: WebConfig) -> list[tuple[str, PipelineStep]]:
    """(tag, step) in the order they run; the tag names a step's unlabelled drops in the stats. An
    unknown `gopher`/`fineweb` override is one clear error."""
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    steps: list[tuple[str, PipelineStep]] = [
        ("no_main_text", MainText(favour_precision=True, timeout=cfg.extract_timeout_s, output_format="markdown",
                                  include_links=True, include_tables=cfg.include_tables)),
        ("language", LanguageFilter(cfg.languages, cfg.language_threshold)),
    ]
    if cfg.gopher_repetition:
        steps.append(("gopher_repetition", GopherRepetitionFilter()))
    for enabled, field, tag, cls, base in ((cfg.gopher_quality, "gopher", "gopher_quality", GopherQualityFilter,
                                            {"min_doc_words": cfg.min_words}),
                                           (cfg.fineweb_quality, "fineweb", "fineweb_quality", FineWebQualityFilter, {})):
        if not enabled:
            continue
        try:
            steps.append((tag, cls(**{**base, **getattr(cfg, field)})))
        except TypeError as err:
            raise PhitrainError(f"web.{field}: {err} (see DataTrove's {cls.__name__} for its arguments)") from None
    return steps


class WebFilters(Accounting, PipelineStep):
    """Runs `web_steps` on the tasks that read a `web` source (task rank // tasks = source index) and
    passes other sources' documents through. The inner DataTrove steps count their own drops by reason
    (`dropped_gopher_short_doc`, ...); when the task ends they are added to this step's stats per source,
    so the data report accounts for every page: read = extracted drops + filter drops + kept."""

    name = "🌐 web extraction + filters"
    type = "phitrain"

    def __init__(self, sources: list[DataSourceConfig], tasks: int, cfg: WebConfig):
        super().__init__()
        self.sources, self.tasks, self.cfg = sources, tasks, cfg

    def run(self, data, rank: int = 0, world_size: int = 1):
        source = self.sources[rank // self.tasks]
        if source.kind != "web":
            yield from data
            return
        steps = web_steps(self.cfg)
        for _, step in steps:
            data = step.run(data, rank, world_size)
        yield from data
        for tag, step in steps:
            stats = step.stats.to_dict()["stats"]
            total = _value(stats.get("total"))
            forwarded = _value(stats.get("forwarded"))
            labelled = 0
            for key, metric in stats.items():
                if key.startswith("dropped_"):
                    self.count(source.name, f"drop:{key.removeprefix('dropped_')}", _value(metric))
                    labelled += _value(metric)
            if total - forwarded - labelled:
                self.count(source.name, f"drop:{tag}", total - forwarded - labelled)


def _value(metric) -> int:
    if metric is None:
        return 0
    return int(metric["total"] if isinstance(metric, dict) else metric)
