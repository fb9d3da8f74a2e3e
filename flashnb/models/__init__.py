"""The models, one file per architecture family (`opt`; `llama`: Llama-style gated FFN), each config
owning its facts (FFN parts, activation, gated or not, Hugging Face key names); `checkpoint` loads
and saves Hugging Face folders, `tokenizer` their tokenizer.json, `fingerprint` identifies a model,
`tiny` writes tiny random checkpoints for tests."""
