"""The translation app built on fngd_hf: Multi30K data, tokenizer, Marian models, BLEU/chrF and the
shuffled-source check (:class:`~fngd_hf.translation.evaluation.ShuffledSourceCheck`, a ``TrainerCallback``),
the model card and the ``translation`` pipeline.

The optimizer library (``fngd_hf``) imports nothing from here. Import the modules themselves
(``fngd_hf.translation.data``, ...): this file imports none of them, so that importing one module
does not load the others (``fngd_hf.translation.pipeline`` registers ``pipeline("translation")``).
"""
