"""Files copied into exported Hugging Face folders as remote code (`trust_remote_code=True`)."""
