"""Analysis of a trained run: styles, suspicion ranking, metrics vs truth, figures and the report.

Modules (import the one you need; this package imports nothing heavy on its own):

* :mod:`.styles`: style discovery (HDBSCAN around an explicit main mode), :func:`~.styles.assign_styles`.
* :mod:`.scores`: per-case suspicion scores and the ranked ``suspicion.csv``.
* :mod:`.metrics`: truth CSV reading/joining and ``metrics.json``.
* :mod:`.plots`: latent maps (PNG, self-contained HTML), loss curves, slice montages.
* :mod:`.report`: the self-contained curation report.
* :mod:`.run`: :func:`~.run.analyze_run`, what ``hypersort analyze`` calls.
* :mod:`.simulate`: a latent simulator with known truth, for tests and tuning.
"""
