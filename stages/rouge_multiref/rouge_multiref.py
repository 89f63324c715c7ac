"""Multi-reference ROUGE for DialogSum as a Hugging Face `evaluate` module, loaded offline by path.

The evaluate stage, a notebook and a Trainer all score with this one module, so they agree to the
last digit with each other and with `stages.rouge` (the scorer itself: this file only wraps it).

    import evaluate
    rouge = evaluate.load("stages/rouge_multiref", keep_in_memory=True)  # a local path: no Hub
    rouge.compute(predictions=["Amanda baked cookies."],
                  references=[["Amanda baked cookies for Jerry.", "Amanda made cookies."]])
    # {"rouge1": ..., "rouge2": ..., "rougeL": ..., "rougeLsum": ...,
    #  "rouge1_mean_ref": ..., ..., "rougeLsum_mean_ref": ...}

Scores are F-measures x100 rounded to 4 decimals: `rouge*` takes the best reference of each
dialogue, `rouge*_mean_ref` the mean over its references; both are then averaged over dialogues
(`stages.rouge.mean_scores(stages.rouge.score_corpus(...))`, exactly). A reference may also be a
single string. `per_dialogue=True` adds `per_dialogue`: `score_corpus`'s list (0..1, unrounded).

Trainer: `Seq2SeqTrainer(..., args=Seq2SeqTrainingArguments(..., predict_with_generate=True),
compute_metrics=rouge.make_compute_metrics(tokenizer, references))`, where `references` holds
each eval example's reference list in eval-dataset order, or is None to score against the
decoded labels (one reference each).

How it loads: evaluate copies this script into its modules cache (HF_MODULES_CACHE, by default
~/.cache/huggingface/modules) and imports it from there, together with the files it imports
relatively. `rouge.py` beside this file is a symlink to `stages/rouge.py`, so `from .rouge import`
brings the project's scorer along (its content is part of the cache key, so an edit is picked up)
and the module works from any directory, without the repo on sys.path. stages/rouge.py must
therefore import only installed libraries, never other project modules.
"""

import datasets
import evaluate
import numpy as np

from .rouge import mean_scores, score_corpus

_DESCRIPTION = """\
Multi-reference ROUGE (rouge1, rouge2, rougeL, rougeLsum) as the DialogSum pipeline scores it:
rouge_score with the Porter stemmer, F-measures; each prediction is scored against each of its
references, keeping the best (`rouge*`) and the mean (`rouge*_mean_ref`) per dialogue; results
are means over dialogues x100, rounded to 4 decimals. rougeLsum splits sentences with a regex
(nltk punkt cannot be downloaded offline). Plain means, no bootstrap aggregation, so the same
inputs always give the same numbers.
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    address = "Barcelona, Spain",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/W04-1013",
    pages = "74--81",
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated summaries, one string per dialogue.
    references: list with, per dialogue, a list of reference summaries (or one string).
    per_dialogue: also return `per_dialogue`, each dialogue's scores (0..1). Default False.
Returns:
    rouge1, rouge2, rougeL, rougeLsum: best-reference F-measure x100, mean over dialogues.
    rouge1_mean_ref, ..., rougeLsum_mean_ref: mean-over-references F-measure x100, same.
    per_dialogue (only if asked): list of dicts with the eight keys above, in 0..1.
Examples:
    >>> rouge = evaluate.load("stages/rouge_multiref")
    >>> rouge.compute(predictions=["the cat sat"], references=[["the cat sat", "a dog"]])["rouge1"]
    100.0
"""


class RougeMultiref(evaluate.Metric):
    """Multi-reference ROUGE, delegating to the project's `stages/rouge.py`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def _compute(self, predictions, references, per_dialogue=False):
        refs = [[r] if isinstance(r, str) else list(r) for r in references]
        scores = score_corpus(list(predictions), refs)
        result = mean_scores(scores)
        if per_dialogue:
            result["per_dialogue"] = scores
        return result

    def make_compute_metrics(self, tokenizer, references=None):
        """A `compute_metrics` for a Seq2SeqTrainer with `predict_with_generate=True`.

        Decodes the generated ids (-100, the Trainer's padding between batches, read as the pad
        token) and scores them against `references` (per eval example, in eval-dataset order),
        or, when None, against the decoded labels.
        """

        def decode(ids) -> list[str]:
            ids = np.asarray(ids)
            ids = np.where(ids == -100, tokenizer.pad_token_id, ids)
            return [t.strip() for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]

        def compute_metrics(eval_prediction) -> dict[str, float]:
            generated = eval_prediction.predictions
            if isinstance(generated, tuple):
                generated = generated[0]
            if np.asarray(generated).ndim != 2:
                raise ValueError("compute_metrics needs generated token ids: set predict_with_generate=True")
            predictions = decode(generated)
            refs = decode(eval_prediction.label_ids) if references is None else references
            if len(refs) != len(predictions):
                raise ValueError(f"got {len(predictions)} predictions but {len(refs)} reference lists")
            return self.compute(
                predictions=predictions, references=[[r] if isinstance(r, str) else list(r) for r in refs]
            )

        return compute_metrics
