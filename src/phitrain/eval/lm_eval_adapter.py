"""lm-evaluation-harness model `phitrain`, so the harness's own tasks run on phitrain checkpoints.

Importing this module registers the model. lm-eval (0.4.x) has no plugin discovery for models, so the
plain `lm_eval` command does not import it by itself; use either

    python -m phitrain.eval.lm_eval_adapter --model phitrain --model_args checkpoint=DIR --tasks ...
    phitrain-lm-eval --model phitrain ...              (console script; same arguments as lm_eval)

or, from Python, `import phitrain.eval.lm_eval_adapter` before `lm_eval.simple_evaluate(model="phitrain")`.
The three request types call the same scoring code as `phitrain eval loglik` / `ppl` (loglik.py), so the
harness and phitrain agree on every number. Offline use: HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1 and task
YAMLs with `dataset_path: json` + local `data_files`, found through `--include_path`.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from phitrain.errors import PhitrainError
from phitrain.eval.loglik import load_for_eval, rolling_logprob, score_continuations


@register_model("phitrain")
class PhitrainLM(LM):
    """model_args: checkpoint=DIR (required), device=cpu|cuda, batch_size=N, max_gen_toks=N.

    The harness passes its own `--device` (default "cuda"); without a GPU we use the CPU, as the
    harness's HF model does."""

    def __init__(self, checkpoint: str | None = None, device: str = "cpu", batch_size: int | str = 16,
                 max_gen_toks: int = 256, **_: object) -> None:
        super().__init__()
        if not checkpoint:
            raise PhitrainError("lm-eval model 'phitrain' needs --model_args checkpoint=DIR")
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        self.model, self.tokenizer = load_for_eval(checkpoint, device)
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        return score_continuations(self.model, self.tokenizer, pairs, batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        eos = self.tokenizer.eos_id
        return [rolling_logprob(self.model, self.tokenizer.encode(r.args[0]), eos, batch_size=self.batch_size)
                for r in requests]

    def generate_until(self, requests) -> list[str]:
        from phitrain.model.generate import complete

        out = []
        for r in requests:
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            top_p = kwargs.pop("top_p", None)
            window = self.model.config.max_position_embeddings
            max_new = min(max_new, window - 1)
            out += complete(self.model, self.tokenizer, [context], max_new, temperature=temperature,
                            top_p=None if top_p is None else float(top_p), stop=until, seed=0)
        return out


def cli() -> None:
    """lm_eval's own command line, with the `phitrain` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    cli()
