"""OpenAI-compatible serving on Ray Serve: ``build_app`` (app.py) = FastAPI ingress + LLMServer engine replicas."""
