"""Memory banks, memory cross-attention and their placement across layers."""
