"""The policy: backbone, tokenizer, and how observations become prompts and text becomes actions."""
