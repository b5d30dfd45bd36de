"""Text generation backends behind one protocol (protocol.py): in process (transformers_backend.py)
or an OpenAI-compatible server (openai_backend.py, server_tokens.py), chosen by backends.py.

Kept light: importing the package loads neither transformers nor the openai client.
"""
