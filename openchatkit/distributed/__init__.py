"""Process layout and process-group plumbing for multi-process training."""
