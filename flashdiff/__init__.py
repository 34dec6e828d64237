"""flashdiff: an MLX inference engine for image and video diffusion."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import flashdiff` stays cheap (the CLI imports MLX only when it runs).
    if name == "Pipeline":
        from .engine.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)


__all__ = ["Pipeline", "__version__"]
