"""flashnb: LLM in a flash (Alizadeh et al., ACL 2024), as a small real engine plus notebooks.

The front door (imported on first use, so `import flashnb` stays light):

    from flashnb import shipped, convert, open_store, FlashEngine, Policy, load_predictors, set_decode_threads

    set_decode_threads()                            # torch threads for token-at-a-time decoding
    m = shipped()                                   # folder, config, tokenizer, predictors
    store = m.store("/tmp/flashnb")                 # the FFN on flash (a bundled store)
    with FlashEngine(store, m.predictors, Policy(window=4, memory_budget=0.5)) as eng:
        ids = list(eng.generate(m.tokenizer.encode("Return a new list containing"), 20, eos_id=2))
    print(m.tokenizer.decode(ids), TokenStats.of(eng.steps, store.num_layers * store.ffn_dim))
"""

from __future__ import annotations

import importlib

from flashnb.errors import FlashnbError

__version__ = "0.1.0"

_FRONT_DOOR = {
    "shipped": "flashnb.shipped_models",
    "convert": "flashnb.core.convert",
    "ConvertConfig": "flashnb.core.convert",
    "open_store": "flashnb.core.store",
    "verify": "flashnb.core.verify",
    "FlashEngine": "flashnb.core.engine",
    "Policy": "flashnb.core.engine",
    "load_predictors": "flashnb.core.predictor",
    "OraclePredictor": "flashnb.core.predictor",
    "AllNeurons": "flashnb.core.predictor",
    "load_thresholds": "flashnb.core.thresholds",
    "GateThresholds": "flashnb.core.thresholds",
    "simulate": "flashnb.core.simulate",
    "TokenStats": "flashnb.lab.stats",
    "set_decode_threads": "flashnb.core.generate",
    "scratch_folder": "flashnb.paths",
}

__all__ = ["FlashnbError", "__version__", *_FRONT_DOOR]


def __getattr__(name: str):
    module = _FRONT_DOOR.get(name)
    if module is None:
        raise AttributeError(f"module 'flashnb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
