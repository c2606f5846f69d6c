"""Data: corpus -> tokenizer -> token cache (memmap) -> resumable sharded sampler -> batches.

Modules: corpus (documents, fingerprint, split), tokens (BPE + cache), prepare (the entry point),
loader (sampler, batches, prefetch). Kept import-free so the CLI can check paths without torch.
"""
