"""nn.Modules of the Qwen3.5 decoder. They receive batch metadata explicitly and know nothing of scheduling."""
