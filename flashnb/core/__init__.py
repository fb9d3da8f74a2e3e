"""Everything that runs a token, in the paper's order:

    defaults    torch-free constants (reads in flight, alignment, gaps, the budget)
    store       the flash store's format: manifest, regions, validation (§3.2 layouts); convert writes one
    io, aio     direct I/O: aligned buffers, O_DIRECT files, Linux native AIO
    requests    which read requests a set of neurons becomes (coalescing)
    reader      NeuronReader: neuron rows from flash, submitted while the engine computes
    predictor   which neurons a token needs (§3.1): low-rank, oracle, all
    window      windowing (§3.1): which neurons to evict and to load
    memory      memory management (§3.3): preallocated rows, swap-with-last; THE budget split
    ffn         the FFN math over a subset of neurons, from their bundles
    records     what the engine did per token, and the recorder that times it from outside
    engine      the per-token loop (FlashFFN.forward) and FlashEngine
    simulate    the engine's reads without the model
    resident    the DRAM-resident part of a model; generate: sampling and the decode loop
"""
