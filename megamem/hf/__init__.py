"""Hugging Face interoperability: megamem models as transformers folders (native Llama or remote code), and back."""
