"""Description metrics with named standard implementations (paper §4.3, Table 4).

- **BLEU-1..4**: corpus BLEU of sacrebleu (``sacrebleu.metrics.BLEU``) with its default, published
  settings: one reference per hypothesis, case-sensitive, the ``13a`` tokenizer (mteval-v13a: numbers
  such as ``0.64`` stay one token), ``exp`` smoothing; BLEU-n sets ``max_ngram_order=n`` (uniform
  weights over 1..n). Each value is sacrebleu's score / 100 and its signature is recorded.
- **ROUGE-1/2/L**: ``rouge_score`` F-measure with the Porter stemmer, the mean over pairs.
- **BERTScore**: ``bert_score`` F1 (the mean over pairs), computed only when the package is
  installed and its model is already on this machine (a local folder, or in the Hugging Face cache);
  otherwise it is ``None`` with the reason. Nothing is downloaded.

A missing or unparsable description is the empty hypothesis: it adds its reference's length to the
corpus (brevity penalty) and no matches, and scores 0 on ROUGE and BERTScore.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

logger = logging.getLogger(__name__)

BLEU_KEYS: tuple[str, ...] = ("bleu1", "bleu2", "bleu3", "bleu4")
ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _sacrebleu() -> Any:
    from sacrebleu.metrics import BLEU  # a core dependency, imported when scoring (it is slow to import)

    return BLEU


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{bleu1..bleu4}`` in [0, 1] of the corpus (sacrebleu, one reference each)."""
    bleu_cls = _sacrebleu()
    return {f"bleu{n}": float(bleu_cls(max_ngram_order=n).corpus_score(list(hypotheses), [list(references)]).score)
            / 100.0 for n in range(1, 5)}


def bleu_signature() -> str:
    """sacrebleu's BLEU-4 signature (settings and version); it is complete only after a scoring."""
    metric = _sacrebleu()(max_ngram_order=4)
    metric.corpus_score(["a"], [["a"]])
    return str(metric.get_signature())


class RougeScorer:
    """ROUGE-1/2/L F-measure of one hypothesis against one reference."""

    def __init__(self) -> None:
        from rouge_score import rouge_scorer

        self._rouge = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)

    def __call__(self, hypothesis: str, reference: str) -> dict[str, float]:
        if not hypothesis:
            return dict.fromkeys(ROUGE_KEYS, 0.0)
        scores = self._rouge.score(reference, hypothesis)
        return {k: float(scores[k].fmeasure) for k in ROUGE_KEYS}


def bertscore_unavailable(model: str) -> str | None:
    """Why BERTScore cannot be computed with ``model`` here, or ``None`` when it can."""
    if package_version("bert-score") is None:
        return "the bert-score package is not installed (`pip install 'pointvl[eval]'`)"
    if os.path.isdir(model):
        return None if os.path.isfile(os.path.join(model, "config.json")) else f"{model} holds no config.json"
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model, "config.json"), str):
        return f"its model {model} is not on this machine (not in the Hugging Face cache; nothing is downloaded)"
    return None


def bertscore_f1(hypotheses: Sequence[str], references: Sequence[str], model: str, num_layers: int) -> list[float]:
    """BERTScore F1 of each pair (``bert_score.score``, no baseline rescaling, no idf); "" scores 0."""
    from bert_score import score

    keep = [i for i, h in enumerate(hypotheses) if h]
    f1 = [0.0] * len(hypotheses)
    if keep:
        _, _, f = score([hypotheses[i] for i in keep], [references[i] for i in keep], model_type=model,
                        num_layers=num_layers, batch_size=32, verbose=False)
        for i, v in zip(keep, f.tolist(), strict=True):
            f1[i] = float(v)
    return f1


def bleu_statistics(hypotheses: Sequence[str], references: Sequence[str], order: int) -> list[list[int]]:
    """Per-pair BLEU-``order`` statistics (lengths, n-gram matches and totals): summed over any set of pairs,
    :func:`bleu_from_statistics` gives that set's corpus BLEU (sacrebleu's own route for its significance tests)."""
    return _sacrebleu()(max_ngram_order=order)._extract_corpus_statistics(list(hypotheses), [list(references)])


@functools.lru_cache(maxsize=4)
def _bleu(order: int) -> Any:
    return _sacrebleu()(max_ngram_order=order)


def bleu_from_statistics(summed: Sequence[float], order: int) -> float:
    """Corpus BLEU-``order`` in [0, 1] of summed :func:`bleu_statistics` rows."""
    return float(_bleu(order)._compute_score_from_stats(list(summed)).score) / 100.0
