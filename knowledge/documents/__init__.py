"""A hospital's own documents in the knowledge base: reading, chunking and keeping them in sync."""
