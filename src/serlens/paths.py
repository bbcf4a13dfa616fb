"""The one path scheme of the workflow's outputs (see docs/architecture.md).

Every dimension of the grid is a path level, in one order::

    {results}/{corpus}/train/{model}/{method}/seed{seed}/fold{fold}/      a training run
    {results}/{corpus}/states/{model}/{variant}/seed{seed}/fold{fold}/    encoder passes of a run
    {results}/{corpus}/states/{model}/base/                               the pre-trained encoder's pass
    {results}/{corpus}/analysis/{model}/{method}/seed{seed}/fold{fold}/{analysis}.tsv
    {results}/{corpus}/tables/{table}.tsv                                 aggregated over folds (and seeds)
    {results}/{corpus}/figures/{family}/{model}.png

``{method}`` names the method and, through it, the protocol (a method spec may set one);
cross-run analyses put their group where a method goes (``lora``: across LoRA ranks).
Corpus-independent outputs: ``{results}/models/{model}.json`` (resolved weights) and
``{results}/report.html``. Logs mirror their output under ``{results}/logs/`` and
Snakemake's per-job benchmarks go to ``{results}/benchmarks/{rule}/...``.

The functions take the values (or Snakemake wildcard patterns such as ``"{model}"``) and
return strings, so the same function builds a rule's output pattern and a concrete path.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Paths:
    results: str

    # --- corpus ---------------------------------------------------------------------------
    def corpus(self, corpus: str, name: str) -> str:
        """``manifest.tsv``, ``summary.tsv`` or ``folds.tsv`` of a corpus."""
        return f"{self.results}/{corpus}/corpus/{name}"

    def weights(self, model: str) -> str:
        return f"{self.results}/models/{model}.json"

    def features(self, corpus: str, model: str) -> str:
        return f"{self.results}/{corpus}/features/{model}/pooled.safetensors"

    # --- runs -----------------------------------------------------------------------------
    def run(self, corpus: str, model: str, method: str, seed, fold) -> str:
        return f"{self.results}/{corpus}/train/{model}/{method}/seed{seed}/fold{fold}"

    def checkpoints(self, corpus: str, model: str, method: str, seed, fold) -> str:
        """Outside the run's declared outputs, so Snakemake's cleanup of a failed job keeps them."""
        return f"{self.results}/checkpoints/{corpus}/{model}/{method}/seed{seed}/fold{fold}"

    def states(self, corpus: str, model: str, variant: str, seed=None, fold=None) -> str:
        """Encoder passes: ``variant`` = a method with its own encoder, or ``base`` (per model:
        every utterance, no seed or fold)."""
        if variant == "base":
            return f"{self.results}/{corpus}/states/{model}/base"
        return f"{self.results}/{corpus}/states/{model}/{variant}/seed{seed}/fold{fold}"

    def states_file(self, corpus: str, model: str, variant: str, seed=None, fold=None) -> str:
        """``states.safetensors`` of a pass (see :meth:`states`)."""
        return f"{self.states(corpus, model, variant, seed, fold)}/states.safetensors"

    def ab_file(self, corpus: str, model: str, method: str, seed, fold) -> str:
        """``ab.safetensors``: the A/B statistics of a LoRA run's pass."""
        return f"{self.states(corpus, model, method, seed, fold)}/ab.safetensors"

    def causal_file(self, corpus: str, model: str, method: str, seed, fold) -> str:
        """``causal.safetensors``: the head's logits of a run under every causal intervention."""
        return f"{self.states(corpus, model, method, seed, fold)}/causal.safetensors"

    def analysis(self, corpus: str, model: str, method: str, seed, fold, name: str) -> str:
        return f"{self.results}/{corpus}/analysis/{model}/{method}/seed{seed}/fold{fold}/{name}.tsv"

    # --- aggregates -----------------------------------------------------------------------
    def table(self, corpus: str, name: str) -> str:
        return f"{self.results}/{corpus}/tables/{name}.tsv"

    def figure(
        self, corpus: str | None, family: str, model: str | None = None, ext: str = "png"
    ) -> str:
        """A per-model figure (``family/{model}.png``) or an all-model one (``family.png``);
        corpus None: a figure of the workflow itself (``{results}/figures/``)."""
        stem = f"{family}/{model}" if model is not None else family
        where = f"{self.results}/{corpus}" if corpus is not None else self.results
        return f"{where}/figures/{stem}.{ext}"

    # --- cross-corpus tests -----------------------------------------------------------------
    def cross(self, train: str, test: str) -> str:
        """Where the runs trained on ``train`` are scored on ``test``; the levels below are
        the corpus's (``tables/``, ``figures/``, ``eval/{model}/{method}/seed{s}/fold{f}/``)."""
        return f"{self.results}/cross_corpus/{train}_to_{test}"

    def cross_eval(self, train: str, test: str, model: str, method: str, seed, fold) -> str:
        return f"{self.cross(train, test)}/eval/{model}/{method}/seed{seed}/fold{fold}"

    # --- bookkeeping ----------------------------------------------------------------------
    def log(self, path: str) -> str:
        """The log of the job writing ``path`` (a path under results)."""
        return f"{self.results}/logs/{_below(path, self.results)}.log"

    def benchmark(self, rule: str, path: str) -> str:
        return f"{self.results}/benchmarks/{rule}/{_below(path, self.results)}.tsv"


def _below(path: str, results: str) -> str:
    prefix = results.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path.lstrip("/")
