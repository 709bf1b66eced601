"""Stage 3: adaptation (fine-tuning strategies, domain-adaptation layers).

Empty in this release: full fine-tuning is the only strategy, configured in ``train``.
Freezing schedules, LR groups, AdaBN/DSBN and DANN/MMD/CORAL arrive here (see the issue
tracker); they plug in between ``models.create_encoder`` and ``train.fit``.
"""

__all__: list[str] = []
