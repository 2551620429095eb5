"""The serve stage: Ray Serve hosts the student behind vLLM's OpenAI-compatible server.

`config.py` types the `serve` config, `model.py` picks the directory to serve (the newest student under
the run root, quantized if present), `app.py` turns both into a Ray Serve LLM application (and a Serve
config YAML), and `stage.py` deploys it and keeps it up.
"""
