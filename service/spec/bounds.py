"""The bounds of a study spec's own fields (the bounds shared with other specs are in
:mod:`service.spec_limits`; docs/study-spec.md lists them all)."""

MAX_TRIALS = 100_000
MAX_SECONDS = 30 * 24 * 3600.0  # 30 days
MAX_PARALLELISM = 64
MAX_SOURCES = 64
MAX_HELDOUT_TOP_K = 100
# a cost budget: examples scored, and seconds on workers (64 workers for 30 days)
MAX_BUDGET_EXAMPLES = 10_000_000_000
MAX_WORKER_SECONDS = MAX_PARALLELISM * MAX_SECONDS
