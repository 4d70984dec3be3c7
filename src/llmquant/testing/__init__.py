"""What llmquant's tests, and anyone checking a change of their own, build models from: tiny random models of
many transformers families (`tiny_models`) and a tiny Llama checkpoint with a real tokenizer (`tiny_checkpoint`)."""
