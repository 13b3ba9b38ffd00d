"""Exporting the kit's models to other runtimes' formats (GGUF for llama.cpp and Ollama)."""
