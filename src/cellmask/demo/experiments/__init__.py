"""The demo's experiments, each a client of the demo's steps: ``make ablation``
(:mod:`~cellmask.demo.experiments.ablation`: paper Table 1's rows) and ``make ablation-real``
(:mod:`~cellmask.demo.experiments.levers`: the real track's levers)."""
