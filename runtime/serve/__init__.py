"""moe-serve: an OpenAI-compatible chat-completions server over one runtime Pipeline (FastAPI + uvicorn)."""
