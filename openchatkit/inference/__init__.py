"""Inference: token generation with streaming and stop strings, and the chat session behind
`inference/bot.py`."""
