"""What the demo writes for people: the tables and overlays it prints and draws
(:mod:`~cellmask.demo.reports.tables`), ``benchmarks/REAL.md`` (:mod:`~cellmask.demo.reports.real`),
``benchmarks/ABLATION.md`` (:mod:`~cellmask.demo.reports.ablation`), ``benchmarks/REAL_LEVERS.md``
(:mod:`~cellmask.demo.reports.levers`). Leaves: the demo's flow and experiments call them; they
import nothing of the demo but :mod:`cellmask.demo.plan`'s names."""
