"""The Azure ML backend: the registry pipeline component `chat_completion_pipeline`, the
workspace's model registry and managed online endpoints, through azure-ai-ml. `azure.ai.ml` is
imported only inside this package."""
