"""`evaluate` metric: how closely a RaNA-adapted model follows its dense original on held-out texts.

Load it with `evaluate.load(rana_hf.evaluation.DENSE_AGREEMENT_METRIC)` (a local path: nothing is downloaded).
The texts are the `predictions` (as in evaluate's own `perplexity` metric); the adapted model and its tokenizer are
compute arguments. The numbers are those of `rana_hf.evaluation.compare_to_dense`.
"""

from __future__ import annotations

import datasets
import evaluate

from rana_hf.calibration import calibration_chunks
from rana_hf.evaluation import compare_to_dense

_DESCRIPTION = """Perplexity of a RaNA-adapted causal LM and of its dense original (the same model with the RaNA layers
switched off), the KL divergence KL(dense || adapted) per predicted token, the fraction of positions where both pick
the same top-1 token, and the FLOP reduction of the targeted linears measured from the masks applied on these texts."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): held-out texts; they are concatenated and cut into chunks of `seq_len` tokens.
    model: a model with a RaNA adapter (`rana_hf.compress` output, or a checkpoint loaded after `import rana_hf`).
    tokenizer: its tokenizer.
    seq_len (int): tokens per chunk (default 512).
    max_tokens (int, optional): stop after this many tokens.
    batch_size (int): chunks per forward pass (default 4).
Returns:
    perplexity, dense_perplexity, kl_to_dense, top1_agreement, tokens, flop_reduction.
Example:
    >>> metric = evaluate.load(rana_hf.evaluation.DENSE_AGREEMENT_METRIC)
    >>> metric.compute(predictions=texts, model=adapted, tokenizer=tokenizer)
"""

_CITATION = """@inproceedings{garcia2025rana,
  title={Adaptive Rank Allocation: Speeding Up Modern Transformers with RaNA Adapters},
  author={Garcia, Roberto and Liu, Jerry and Sorvisto, Daniel and Eyuboglu, Sabri},
  booktitle={International Conference on Learning Representations},
  year={2025}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RanaDenseAgreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model=None, tokenizer=None, seq_len=512, max_tokens=None, batch_size=4):
        if model is None or tokenizer is None:
            raise ValueError("rana_dense_agreement needs compute(predictions=texts, model=adapted, tokenizer=tok)")
        chunks = calibration_chunks(list(predictions), tokenizer, seq_len=seq_len, max_tokens=max_tokens)
        if chunks.shape[0] == 0:
            raise ValueError(f"the texts give fewer than seq_len={seq_len} tokens; pass more text or lower seq_len")
        return compare_to_dense(model, chunks, batch_size)
