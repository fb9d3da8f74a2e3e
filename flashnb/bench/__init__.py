"""`flashnb bench`: the configurations (run), the baselines they are measured against, the trace replay
at OPT 6.7B's shape, and the result's JSON and table (report)."""
