"""scoring-gateway: a credential-injecting sidecar for Azure Machine Learning scoring endpoints."""

__version__ = "0.1.0"
