"""`phitrain serve`: an OpenAI-compatible server for phitrain checkpoints.

`engine` batches concurrent requests through the KV-cache model (continuous batching, per-row sampling),
`protocol` holds the accepted request shapes and the chat template, `app` the HTTP layer and `serve()`.
"""
