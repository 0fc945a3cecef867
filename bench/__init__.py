"""Speed and memory bench of Delta Sampling (see README.md); nothing here is imported by the extension."""
