"""Analysis of a trained run: styles, suspicion ranking, metrics vs truth, figures and the report.

Modules (import the one you need; this package imports nothing on its own), bottom up:

* :mod:`.dice`: the one Dice. :mod:`.styles`: style discovery (HDBSCAN around an explicit main mode),
  :func:`~.styles.assign_styles`. :mod:`.localisation`: where a label disagrees with the main style
  (connected components, maps). :mod:`.scores`: per-case suspicion scores, the combined default
  ``suspicion`` and the ranked table. :mod:`.trajectory`: scores of each λ's path during training.
  :mod:`.metrics`: scores and styles against a truth table. :mod:`.plots`: latent maps, loss curves,
  slice montages. :mod:`.report`: the self-contained curation report. :mod:`.simulate`: latents with
  known truth, for tests and tuning.
* :mod:`.evaluation`: the run's cases, its latents in datalist order, the evaluation grid, and
  :class:`~.evaluation.SegmentationModel` (what the analysis uses of a model its caller loaded).
* :mod:`.figures`: case thumbnails and style montages.
* :mod:`.model_scores`: model-based scores and the ``predictor`` hook. :mod:`.baselines`: out-of-fold
  Test-Dice and cleanlab. :mod:`.correct`: ``hypersort correct``.
* :mod:`.run`: :func:`~.run.analyze_run`, the latent analysis (``hypersort analyze --latent-only``).
* :mod:`.analyze`: :func:`~.analyze.analyze`, the whole analysis with a model (``hypersort analyze``).
"""
