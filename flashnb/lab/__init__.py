"""The lessons' experiments, one module per notebook, each returning typed results that flashnb.viz draws.

    stats        TokenStats: the only per-token means (and spreads) of a run's records
    quickstart   00: the store, where DRAM goes, what a token moves
    flash        01: the reader against the device profile; bundled vs unbundled reads on real stores
    sparsity     02: predictor quality at any threshold (ThresholdExplorer)
    windowing    03: data read per token by window size (simulate)
    bundling     04: bundled vs unbundled engine runs
    memory       05: preallocated rows with swap-with-last deletion vs reallocation, timed
    end_to_end   06: the bench beside the paper's Tables 2 and 3; latency vs DRAM budget
    pinning      06: the budget split between hot neurons pinned and the window (PowerInfer)
    byo          07: your own model, dense vs flash
    exercises    the "try this" cells: a guess against the measured answer
"""
