"""One file per architecture family: `opt` and `llama` (Llama-style gated FFN)."""
